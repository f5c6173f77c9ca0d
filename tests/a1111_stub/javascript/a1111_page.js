// Stand-in for the parts of A1111 1.10.1's page scripts the LoRA Train tab relies on, with the
// same behaviour (rewritten, not copied):
//   script.js      gradioApp, get_uiCurrentTabContent, updateInput, and the keydown handler:
//                  Esc clicks the current tab's
//                  button[id$=_interrupt] when its style.display is "block" (it reads .style of
//                  that button unguarded: a tab without one throws on every Esc)
//   ui.js          opts, args_to_array, switch_to_txt2img
//   progressbar.js randomId, formatTime, requestProgress (polls ./internal/progress, puts a
//                  .progressDiv before the container with "<textinfo> <pct>% ETA: <time>", a
//                  .livePreview before the gallery, removes both and calls atEnd when the task
//                  completes or stops being active)

var opts = {show_progressbar: true, live_previews_enable: true, live_preview_refresh_period: 500,
            show_progress_in_title: true};

function gradioApp() {
    var elems = document.getElementsByTagName("gradio-app");
    var root = elems.length == 0 ? null : elems[0].shadowRoot;
    return root ? root : document;
}

function get_uiCurrentTabContent() {
    return gradioApp().querySelector('#tabs > .tabitem[id^=tab_]:not([style*="display: none"])');
}

document.addEventListener("keydown", function(e) {
    var content = get_uiCurrentTabContent();
    var interruptButton = content.querySelector("button[id$=_interrupt]");
    if (e.key === "Escape") {
        var globalPopup = document.querySelector(".global-popup");
        if (!globalPopup || globalPopup.style.display === "none") {
            if (interruptButton.style.display === "block") {
                interruptButton.click();
                e.preventDefault();
            }
        }
    }
});

function updateInput(target) {
    var e = new Event("input", {bubbles: true});
    Object.defineProperty(e, "target", {value: target});
    target.dispatchEvent(e);
}

function args_to_array(args) {
    var res = [];
    for (var i = 0; i < args.length; i++) {
        res.push(args[i]);
    }
    return res;
}

function switch_to_txt2img() {
    gradioApp().querySelector("#tabs").querySelectorAll("button")[0].click();
    return args_to_array(arguments);
}

function randomId() {
    var part = function() {
        return Math.random().toString(36).slice(2, 7);
    };
    return "task(" + part() + part() + part() + ")";
}

function pad2(x) {
    return x < 10 ? "0" + x : x;
}

function formatTime(secs) {
    if (secs > 3600) {
        return pad2(Math.floor(secs / 3600)) + ":" + pad2(Math.floor(secs / 60) % 60) + ":" + pad2(Math.floor(secs) % 60);
    }
    if (secs > 60) {
        return pad2(Math.floor(secs / 60)) + ":" + pad2(Math.floor(secs) % 60);
    }
    return Math.floor(secs) + "s";
}

function requestProgress(id_task, progressbarContainer, gallery, atEnd, onProgress, inactivityTimeout = 40) {
    var dateStart = new Date();
    var wasEverActive = false;
    var parentProgressbar = progressbarContainer.parentNode;
    var parentGallery = gallery ? gallery.parentNode : null;
    var divProgress = document.createElement("div");
    divProgress.className = "progressDiv";
    divProgress.style.display = opts.show_progressbar ? "block" : "none";
    var divInner = document.createElement("div");
    divInner.className = "progress";
    divProgress.appendChild(divInner);
    parentProgressbar.insertBefore(divProgress, progressbarContainer);
    var livePreview = null;
    if (parentGallery) {
        livePreview = document.createElement("div");
        livePreview.className = "livePreview";
        parentGallery.insertBefore(livePreview, gallery);
    }
    var removeProgressBar = function() {
        parentProgressbar.removeChild(divProgress);
        if (parentGallery) {
            parentGallery.removeChild(livePreview);
        }
        atEnd();
    };
    var poll = function(id_live_preview) {
        fetch("./internal/progress", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({id_task: id_task, id_live_preview: id_live_preview})})
            .then(function(response) {
                if (!response.ok) {
                    throw new Error(response.status);
                }
                return response.json();
            })
            .then(function(res) {
                if (res.completed) {
                    removeProgressBar();
                    return;
                }
                var text = "";
                divInner.style.width = (res.progress || 0) * 100.0 + "%";
                divInner.style.background = res.progress ? "" : "transparent";
                if (res.progress > 0) {
                    text = ((res.progress || 0) * 100.0).toFixed(0) + "%";
                }
                if (res.eta) {
                    text += " ETA: " + formatTime(res.eta);
                }
                if (res.textinfo && res.textinfo.indexOf("\n") == -1) {
                    text = res.textinfo + " " + text;
                }
                divInner.textContent = text;
                if (res.active) {
                    wasEverActive = true;
                }
                var elapsed = (new Date() - dateStart) / 1000;
                if ((!res.active && wasEverActive) || (elapsed > inactivityTimeout && !res.queued && !res.active)) {
                    removeProgressBar();
                    return;
                }
                if (res.live_preview && livePreview) {
                    var img = new Image();
                    img.onload = function() {
                        livePreview.appendChild(img);
                        if (livePreview.childElementCount > 2) {
                            livePreview.removeChild(livePreview.firstElementChild);
                        }
                    };
                    img.src = res.live_preview;
                }
                if (onProgress) {
                    onProgress(res);
                }
                setTimeout(function() {
                    poll(res.id_live_preview);
                }, opts.live_preview_refresh_period || 500);
            })
            .catch(function() {
                removeProgressBar();
            });
    };
    poll(0);
}
