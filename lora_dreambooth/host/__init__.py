"""The A1111 side of lora-dreambooth: the only code that imports A1111's ``modules.*``.

It turns the tab's controls and the API's JSON into one ``TrainConfig``, runs the engine under
A1111's GPU queue lock, and turns the engine's callbacks into A1111 progress, live previews,
and files A1111's Lora loader picks up at once.

    entry        the three callbacks scripts/lora_train.py registers
    settings     the "LoRA Train" settings section
    paths        where runs, uploads and LoRAs go
    a1111        model checks, deactivating A1111's merged LoRAs, Lora list refresh
    progress     engine progress → shared.state (progress bar, textinfo, live preview)
    render       txt2img through A1111's own processing (previews, class images)
    files        uploads: sanitised names, image checks, duplicates skipped, atomic copies
    class_images "Generate N class images", reused while prompt and model are unchanged
    job          the one training job both the tab and the API run
    job_queue    the run queue on disk (queue.json, each job's copy of its images, its checkpoint)
    runner       takes jobs off the queue one at a time (tab's Start, Add to queue, API)
    headroom     whether the machine has room for A1111 to use the LoRA just trained
    token_check  how the loaded model's tokenizer reads a trigger; "Show prior" renders
    contamination  the contamination grid: txt2img with <lora:name:w>, model restored, saved
    ui           the tab
    ui_tools     the tab's trigger check and contamination grid section
    ui_datasets  the tab's dataset tabs (upload, delete, class images) and epoch line
    ui_queue     the tab's Add to queue and Queue section (list, Start queue, Remove, Resume,
                 Copy as command)
    api          /lora-train/v1/* routes
"""
