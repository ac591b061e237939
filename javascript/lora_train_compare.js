// Train LoRA, Compare view: "Send to txt2img" puts `<lora:NAME:W> trigger` into txt2img's prompt and opens the
// txt2img tab. Loaded by the WebUI with the extension's other scripts; the Compare section calls
// loraTrainCompareToTxt2img(text) after its server handler has written the text (#lora_train_compare_send_text).
function loraTrainCompareToTxt2img(text) {
    if (typeof text !== "string" || text.indexOf("<lora:") !== 0) {
        return false;   // an error message, or nothing chosen: leave txt2img alone
    }
    var root = typeof gradioApp === "function" ? gradioApp() : document;
    var area = root.querySelector("#txt2img_prompt textarea");
    if (!area) {
        return false;
    }
    area.value = text;
    if (typeof updateInput === "function") {
        updateInput(area);          // tells Gradio the value changed (the WebUI's helper)
    } else {
        area.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    }
    return true;
}
