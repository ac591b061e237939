// Train LoRA tab: keeps the Train section live. Every 1.5 s, while the tab is on screen and the browser tab is
// visible, it clicks the tab's own Refresh button (#lora_train_poll); the server answers "no change" unless the
// job moved, so this is cheap. Works in the WebUI (this file is loaded by it) and on the standalone page.
(function () {
    if (window.loraTrainPollStarted) {
        return;
    }
    window.loraTrainPollStarted = true;
    var PERIOD_MS = 1500;

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
    }

    setInterval(loraTrainTick, PERIOD_MS);
})();
