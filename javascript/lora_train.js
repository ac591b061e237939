// Train LoRA tab: keeps the Train section live. Every 1.5 s, while the tab is on screen and the browser tab is
// visible, it clicks the tab's own Refresh button (#lora_train_poll); the server answers "no change" unless the
// job moved, so this is cheap. Works in the WebUI (this file is loaded by it) and on the standalone page.
//
// Inside the WebUI a running job also gets the WebUI's own progress bar: the progress view carries the job's
// WebUI task id (data-task-id), and the WebUI's requestProgress() polls /internal/progress with it (bar, text
// with epoch / loss / it/s, its ETA made ours by the host, the latest sample as the live preview); the text
// line under it then drops its own ETA, so one ETA shows. The standalone page has no requestProgress and keeps
// only the tab's own bar.
(function () {
    if (window.loraTrainPollStarted) {
        return;
    }
    window.loraTrainPollStarted = true;
    var PERIOD_MS = 1500;
    var attached = null;        // task id the WebUI's bar is showing now
    var ended = {};             // task id -> the job's step when its WebUI bar went away

    function loraTrainRoot() {
        if (typeof gradioApp === "function") {
            return gradioApp();
        }
        var app = document.getElementsByTagName("gradio-app");
        if (app.length && app[0].shadowRoot) {
            return app[0].shadowRoot;
        }
        return document;
    }

    function loraTrainStyle() {
        if (document.getElementById("lora_train_webui_progress_style")) {
            return;
        }
        var style = document.createElement("style");
        style.id = "lora_train_webui_progress_style";
        // the WebUI places its bar above a gallery (absolute, 14 px up); here it sits in the flow instead, and
        // the tab's own bar steps aside while the WebUI's is shown (the text line under it stays)
        style.textContent = "#lora_train_webui_progress .progressDiv{position:relative;top:0;margin:4px 0;}" +
            "#lora_train_root.lora-train-webui-progress .lora-train-progress{display:none;}" +
            "#lora_train_root.lora-train-webui-progress .lora-train-eta{display:none;}";
        document.head.appendChild(style);
    }

    function loraTrainWebuiBar(root, tab, view) {
        if (typeof requestProgress !== "function") {
            return;
        }
        var taskId = view.getAttribute("data-task-id") || "";
        var step = view.getAttribute("data-step") || "0";
        if (!taskId || view.getAttribute("data-status") !== "running" || attached === taskId) {
            return;
        }
        // a bar that went away while the job still shows "running" (a stale view, or the run waiting for the
        // WebUI's queue longer than the bar's inactivity limit) comes back only once the job has moved on
        if (ended[taskId] !== undefined && ended[taskId] === step) {
            return;
        }
        var block = root.querySelector("#lora_train_progress");
        if (!block || !block.parentNode) {
            return;
        }
        var holder = root.querySelector("#lora_train_webui_progress");
        if (!holder) {
            holder = document.createElement("div");
            holder.id = "lora_train_webui_progress";
            block.parentNode.insertBefore(holder, block);
        }
        holder.innerHTML = "";
        var anchor = document.createElement("div");
        holder.appendChild(anchor);
        loraTrainStyle();
        var sample = root.querySelector("#lora_train_sample");
        attached = taskId;
        tab.classList.add("lora-train-webui-progress");
        requestProgress(taskId, anchor, sample, function () {
            var current = root.querySelector("#lora_train_progress .lora-train-progress[data-task-id]");
            ended[taskId] = current ? (current.getAttribute("data-step") || "0") : step;
            if (attached === taskId) {
                attached = null;
                tab.classList.remove("lora-train-webui-progress");
            }
            var button = root.querySelector("#lora_train_poll");
            if (button) {
                button.click();     // the final state of the run, without waiting for the next tick
            }
        });
    }

    function loraTrainTick() {
        if (document.hidden) {
            return;
        }
        var root = loraTrainRoot();
        var tab = root.querySelector("#lora_train_root");
        var button = root.querySelector("#lora_train_poll");
        // offsetParent is null while the WebUI shows another tab
        if (!tab || !button || tab.offsetParent === null) {
            return;
        }
        button.click();
        var view = root.querySelector("#lora_train_progress .lora-train-progress[data-task-id]");
        if (view) {
            loraTrainWebuiBar(root, tab, view);
        }
    }

    setInterval(loraTrainTick, PERIOD_MS);
})();
