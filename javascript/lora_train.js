// LoRA Train tab: start buttons go through A1111's progress machinery (progressbar.js:
// randomId, requestProgress), like textualInversion.js; while training runs, the hidden
// refresh button is clicked now and then so previews, loss curve and log follow along.
//
// Never write into an element gradio renders: in gradio 3.41 an HTML component's elem_id is
// on its wrapper and on the inner element gradio updates, so querySelector finds the wrapper,
// and emptying it deletes the inner element: every later reply would go nowhere. The server
// replaces messages itself (Start's first event clears or fills #lora_train_error at once).

var loraTrainLastRefresh = 0;

function lora_train_refresh() {
    var button = gradioApp().getElementById("lora_train_refresh");
    if (button) {
        button.click();
    }
}

// Start's run event: args are (task id, go, form…); go is empty when the check refused.
function lora_train_start() {
    var res = args_to_array(arguments);
    if (!res[1]) {
        res[0] = "";
        return res;
    }
    var id = randomId();
    // A1111's key handler (script.js) clicks button[id$=_interrupt] on Esc while it shows "block".
    var interrupt = gradioApp().getElementById("lora_train_interrupt");
    interrupt.style.display = "block";
    requestProgress(
        id,
        gradioApp().getElementById("lora_train_output"),
        gradioApp().getElementById("lora_train_previews"),
        function() {
            interrupt.style.display = "";
            lora_train_refresh();
        },
        function() {
            var now = Date.now();
            if (now - loraTrainLastRefresh > 3000) {
                loraTrainLastRefresh = now;
                lora_train_refresh();
            }
        }
    );
    res[0] = id;
    return res;
}

function lora_train_start_class() {
    var id = randomId();
    requestProgress(
        id,
        gradioApp().getElementById("lora_train_class_output"),
        gradioApp().getElementById("lora_train_class_gallery"),
        function() {},
        function() {}
    );

    var res = args_to_array(arguments);
    res[0] = id;
    return res;
}

// "Show prior" and "Render grid": progress bar and live preview for their renders.
function lora_train_start_render(progressId, galleryId, args) {
    var id = randomId();
    requestProgress(
        id,
        gradioApp().getElementById(progressId),
        gradioApp().getElementById(galleryId),
        function() {},
        function() {}
    );

    var res = args_to_array(args);
    res[0] = id;
    return res;
}

function lora_train_start_prior() {
    return lora_train_start_render("lora_train_prior", "lora_train_prior", arguments);
}

function lora_train_start_grid() {
    return lora_train_start_render("lora_train_grid_output", "lora_train_grid_image", arguments);
}

function lora_train_send_to_txt2img(prompt) {
    var textarea = gradioApp().querySelector("#txt2img_prompt textarea");
    if (textarea && prompt) {
        textarea.value = prompt;
        updateInput(textarea);
        switch_to_txt2img();
    }
    return [];
}
