// LoRA Train tab: start buttons go through A1111's progress machinery (progressbar.js:
// randomId, requestProgress), like textualInversion.js; while training runs, the hidden
// refresh button is clicked now and then so previews, loss curve and log follow along.

var loraTrainLastRefresh = 0;

function lora_train_refresh() {
    var button = gradioApp().getElementById("lora_train_refresh");
    if (button) {
        button.click();
    }
}

function lora_train_start() {
    gradioApp().querySelector("#lora_train_error").innerHTML = "";

    var id = randomId();
    requestProgress(
        id,
        gradioApp().getElementById("lora_train_output"),
        gradioApp().getElementById("lora_train_previews"),
        function() {
            lora_train_refresh();
        },
        function(progress) {
            gradioApp().getElementById("lora_train_progress").innerHTML = progress.textinfo || "";
            var now = Date.now();
            if (now - loraTrainLastRefresh > 3000) {
                loraTrainLastRefresh = now;
                lora_train_refresh();
            }
        }
    );

    var res = args_to_array(arguments);
    res[0] = id;
    return res;
}

function lora_train_start_class() {
    gradioApp().querySelector("#lora_train_error").innerHTML = "";

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
    gradioApp().querySelector("#lora_train_error").innerHTML = "";

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
