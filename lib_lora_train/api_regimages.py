"""The HTTP API's route for regularisation images: POST /projects/{project}/reg-images draws (or finds in the
cache) class images for prior preservation with the host's model, the WebUI's own txt2img inside the WebUI
(prep/regimages.py). The answer holds the run keys that use them (`config`: pass it in POST /runs)."""
from typing import Any, Dict, Optional

from fastapi import APIRouter
from pydantic import Field

from .errors import LoraTrainError


def add_reg_images_route(router: APIRouter, wf: Any, strict: Any, errors: Any, fail: Any) -> None:
    class RegImagesRequest(strict):
        prompt: str = Field(..., description="The class prompt, e.g. 'a photo of a woman' (also every caption)")
        count: int = Field(..., ge=1, le=10000, description="How many images (a larger count adds the missing ones)")
        negative_prompt: str = Field("", description="Negative prompt")
        width: Optional[int] = Field(None, ge=64, le=4096, description="Default: the run's resolution")
        height: Optional[int] = Field(None, ge=64, le=4096, description="Default: the run's resolution")
        sampler: str = Field("dpm++_2m_karras", description="dpm++_2m_karras (DPM++ 2M Karras), euler_a, ddim, ...")
        steps: int = Field(20, ge=1, le=150)
        cfg_scale: float = Field(7.0, gt=0, le=30)
        seed: int = Field(0, ge=0, description="Image i gets seed + i")
        repeats: int = Field(1, ge=1, le=1000, description="The N of the N_<class> folder")

    @router.post("/projects/{project}/reg-images", summary="Generate regularisation images",
                 responses=errors(400, 404))
    def post_reg_images(project: str, req: RegImagesRequest) -> Dict[str, Any]:
        """Class images for prior preservation, drawn by the host's model (inside the WebUI: its txt2img on the
        loaded checkpoint) with fixed seeds, cached in the project per model, prompt, size, sampler, steps, CFG
        and seed: the same request again returns at once, a larger count draws only the missing ones. Answers
        where they are (`reg_data_dir`), how many were drawn and reused, and `config`: the run keys
        (reg_images_prompt, ...) that make a run of this project use them with prior_loss_weight."""
        from .prep.regimages import RegRequest, default_size_for_host, generate_for_project
        proj = wf.project(project)
        try:
            size = default_size_for_host(wf.host)
            rr = RegRequest(prompt=req.prompt, count=req.count, width=req.width or size[0],
                            height=req.height or size[1], negative_prompt=req.negative_prompt, sampler=req.sampler,
                            steps=req.steps, cfg_scale=req.cfg_scale, seed=req.seed, repeats=req.repeats)
            return generate_for_project(wf.host, proj, rr)
        except LoraTrainError as exc:
            raise fail(exc) from None
