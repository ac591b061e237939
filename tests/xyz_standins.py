"""A stand-in of A1111 1.10's scripts/xyz_grid.py, ScriptRunner and processing, as far as our X/Y/Z glue uses them.

What it keeps from the real ones (read from A1111 v1.10.1's scripts/xyz_grid.py): AxisOption(label, type, apply,
format_value, confirm, cost, choices, prepare); AxisOptionTxt2Img / AxisOptionImg2Img filtered in ui() with
`type(x) == AxisOption or x.is_img2img == is_img2img`; ui() returns 18 controls whose values are the UI's (axis
*labels* in the type dropdowns, which the page turns into indices); run(p, 18 arguments) indexes
`current_axis_options` with the type arguments, takes a choices-axis' values from the dropdown list unless
csv_mode, converts and confirms values, applies X then Y then Z to a copy of p per cell, leaves cells blank
once interrupted and writes the job count; the runner's arguments: position 0 = selected script + 1, every
script at args_from..args_to; the built-in Seed script's setup() overwrites p.seed from its slice unless p.is_api.
"""
import csv
import types
from copy import copy
from io import StringIO
from itertools import chain
from types import SimpleNamespace

from PIL import Image

from webui_standins import FIFOLockStandIn, StateStandIn


class Control:
    def __init__(self, label, value, elem_id=None, choices=None):
        self.label, self.value, self.elem_id, self.choices = label, value, elem_id, choices


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {round(x, 8) if isinstance(x, float) else x}"


def format_value(p, opt, x):
    return round(x, 8) if isinstance(x, float) else x


def format_nothing(p, opt, x):
    return ""


def do_nothing(p, x, xs):
    pass


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


def apply_prompt(p, x, xs):
    if xs[0] not in p.prompt and xs[0] not in p.negative_prompt:
        raise RuntimeError(f"Prompt S/R did not find {xs[0]} in prompt or negative prompt.")
    p.prompt = p.prompt.replace(xs[0], x)
    p.negative_prompt = p.negative_prompt.replace(xs[0], x)


def list_to_csv_string(data_list):
    with StringIO() as o:
        csv.writer(o).writerow(data_list)
        return o.getvalue().strip()


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(csv.reader(StringIO(data_str), skipinitialspace=True))))


def make_xyz_module(*, extra_axes=(), signature="1.10"):
    """A fresh xyz_grid module (as each WebUI load gives). `extra_axes`: labels other extensions appended before
    ours. `signature`: "1.10" (18 arguments) or "1.5" (no vary_seeds_*, no csv_mode: 14 arguments)."""
    mod = types.ModuleType("xyz_grid_standin")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                     choices=None, prepare=None):
            self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
            self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare

    class AxisOptionImg2Img(AxisOption):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.is_img2img = True

    class AxisOptionTxt2Img(AxisOption):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.is_img2img = False

    mod.AxisOption, mod.AxisOptionImg2Img, mod.AxisOptionTxt2Img = AxisOption, AxisOptionImg2Img, AxisOptionTxt2Img
    mod.format_value_add_label, mod.format_value = format_value_add_label, format_value
    mod.list_to_csv_string, mod.csv_string_to_list_strip = list_to_csv_string, csv_string_to_list_strip
    mod.axis_options = [
        AxisOption("Nothing", str, do_nothing, format_value=format_nothing),
        AxisOption("Seed", int, apply_field("seed")),
        AxisOption("Steps", int, apply_field("steps")),
        AxisOptionTxt2Img("Hires steps", int, apply_field("hr_second_pass_steps")),
        AxisOption("CFG Scale", float, apply_field("cfg_scale")),
        AxisOptionImg2Img("Image CFG Scale", float, apply_field("image_cfg_scale")),
        AxisOption("Prompt S/R", str, apply_prompt, format_value=format_value),
        AxisOptionTxt2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value,
                          choices=lambda: ["Euler a", "DPM++ 2M"]),
        AxisOptionImg2Img("Sampler", str, apply_field("sampler_name"), format_value=format_value,
                          choices=lambda: ["Euler a", "DPM++ 2M"]),
        AxisOptionTxt2Img("Hires sampler", str, apply_field("hr_sampler_name"), choices=lambda: ["Euler a"]),
        AxisOptionTxt2Img("Hires upscaler", str, apply_field("hr_upscaler"), choices=lambda: ["Latent"]),
        AxisOptionImg2Img("Cond. Image Mask Weight", float, apply_field("inpainting_mask_weight")),
    ]
    for label in extra_axes:
        mod.axis_options.append(AxisOption(label, float, apply_field("extra_" + label.replace(" ", "_"))))
    class Processed:
        def __init__(self, p, images_list, seed=-1, info=""):
            self.images, self.seed, self.infotexts = images_list, seed, [info]
    mod.Processed = Processed
    mod.process_images = None        # `from modules.processing import process_images`: set by make_webui
    mod.Script = _script_class(mod, signature)
    return mod


def _script_class(mod, signature):
    new = signature == "1.10"

    class Script:
        filename = "scripts/xyz_grid.py"
        args_from = args_to = None
        controls = None

        def title(self):
            return "X/Y/Z plot"

        def ui(self, is_img2img):
            self.current_axis_options = [x for x in mod.axis_options
                                         if type(x) == mod.AxisOption or x.is_img2img == is_img2img]  # noqa: E721
            opts = self.current_axis_options
            out = []
            for letter, default in (("x", opts[1].label), ("y", opts[0].label), ("z", opts[0].label)):
                out += [Control(f"{letter.upper()} type", default, f"script_xyz_{letter}_type",
                                [o.label for o in opts]),
                        Control(f"{letter.upper()} values", "", f"script_xyz_{letter}_values"),
                        Control(f"{letter.upper()} values", None)]
            out += [Control("Draw legend", True), Control("Include Sub Images", False),
                    Control("Include Sub Grids", False), Control("Keep -1 for seeds", False)]
            if new:
                out += [Control("Vary seeds for X", False), Control("Vary seeds for Y", False),
                        Control("Vary seeds for Z", False)]
            out += [Control("Grid margins (px)", 0)]
            if new:
                out += [Control("Use text inputs instead of dropdowns", False)]
            return out

        def _run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
                 z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
                 margin_size, csv_mode=False):
            state = p.standin.state
            if not no_fixed_seeds and p.seed == -1:
                p.seed = 4242

            def process_axis(opt, vals, vals_dropdown):
                if opt.label == "Nothing":
                    return [0]
                if opt.choices is not None and not csv_mode:
                    valslist = vals_dropdown
                else:
                    valslist = csv_string_to_list_strip(vals)
                valslist = [opt.type(x) for x in valslist]
                if opt.confirm:
                    opt.confirm(p, valslist)
                return valslist

            x_opt = self.current_axis_options[x_type]          # a label here fails as in the real script
            y_opt = self.current_axis_options[y_type]
            z_opt = self.current_axis_options[z_type]
            xs = process_axis(x_opt, x_values, x_values_dropdown)
            ys = process_axis(y_opt, y_values, y_values_dropdown)
            zs = process_axis(z_opt, z_values, z_values_dropdown)
            state.job_count = len(xs) * len(ys) * len(zs)
            cells = {}
            for iz, z in enumerate(zs):
                for iy, y in enumerate(ys):
                    for ix, x in enumerate(xs):
                        if state.interrupted:
                            cells[(ix, iy, iz)] = None
                            continue
                        pc = copy(p)
                        x_opt.apply(pc, x, xs)
                        y_opt.apply(pc, y, ys)
                        z_opt.apply(pc, z, zs)
                        try:                        # as the real cell(): an error leaves the cell empty
                            cells[(ix, iy, iz)] = mod.process_images(pc)
                        except Exception:  # noqa: BLE001
                            cells[(ix, iy, iz)] = mod.Processed(p, [], p.seed, "")
            self.last = SimpleNamespace(xs=xs, ys=ys, cells=cells,
                                        x_labels=[x_opt.format_value(p, x_opt, x) for x in xs],
                                        y_labels=[y_opt.format_value(p, y_opt, y) for y in ys])
            cell = 16
            grid = Image.new("RGB", (cell * len(xs), cell * len(ys)), (0, 0, 0))
            self.last.cell_images = {}
            for (ix, iy, _), res in cells.items():
                if res is not None and res.images:   # an empty cell stays black, as Image.new() in the real one
                    grid.paste(res.images[0].resize((cell, cell)), (ix * cell, iy * cell))
                    self.last.cell_images[(ix, iy)] = res.images[0]
            first = next((r for r in cells.values() if r is not None and r.images), None)
            info = f"{p.prompt}\nSeed: {p.seed}, Script: X/Y/Z plot, X Type: {x_opt.label}, X Values: {x_values}"
            return SimpleNamespace(images=[grid], infotexts=[info], seed=p.seed if first is None else first.seed)

    if new:
        def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
                z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x,
                vary_seeds_y, vary_seeds_z, margin_size, csv_mode):
            return self._run(p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
                             z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
                             no_fixed_seeds, margin_size, csv_mode)
    else:
        def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
                z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
                margin_size):
            return self._run(p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
                             z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
                             no_fixed_seeds, margin_size)
    Script.run = run
    return Script


class SeedScript:
    """The built-in Seed script (ScriptBuiltinUI): always on; its setup() sets p.seed from its controls."""
    alwayson = True
    setup_for_ui_only = True
    controls = [Control("Seed", -1), Control("Extra", False)]

    def title(self):
        return "Seed"

    def setup(self, p, seed, extra):
        p.seed = seed


class OtherScript:
    """Some other selectable script listed before X/Y/Z plot (its index shifts X/Y/Z's)."""
    alwayson = False
    controls = [Control("Whatever", "a"), Control("More", 3)]

    def title(self):
        return "Prompts from file"

    def run(self, p, *args):
        raise AssertionError("the wrong script ran")


class RunnerStandIn:
    """modules.scripts.ScriptRunner after its UI is built: args ranges assigned in order from 1."""

    def __init__(self, xyz_script, is_img2img=False, extra_before=True):
        self.scripts = [SeedScript()] + ([OtherScript()] if extra_before else []) + [xyz_script]
        self.selectable_scripts = [s for s in self.scripts if not getattr(s, "alwayson", False)]
        n = 1
        for s in self.scripts:
            if s is xyz_script:
                s.controls = s.ui(is_img2img)
            s.args_from, s.args_to = n, n + len(s.controls)
            n = s.args_to

    def setup_scrips(self, p, *, is_ui=True):
        for s in self.scripts:
            if hasattr(s, "setup") and not (not is_ui and s.setup_for_ui_only):
                s.setup(p, *p.script_args[s.args_from:s.args_to])

    def run(self, p, *args):
        index = args[0]
        if not index:
            return None
        script = self.selectable_scripts[index - 1]
        return script.run(p, *args[script.args_from:script.args_to])


def make_webui(tmp_path, *, xyz_module=None, lora_dir=None, networks=None, before_ui=None):
    """shared / scripts / processing / call_queue stand-ins wired together; `.prompts` logs every cell.
    `before_ui(scripts)` runs before the X/Y/Z script's ui() (where the real WebUI imports extension scripts)."""
    xyz_module = xyz_module or make_xyz_module()
    standin = SimpleNamespace(state=StateStandIn(), prompts=[], seeds=[], cells=[], on_cell=None, nan_cells=set())
    opts = SimpleNamespace(grid_save=True, outdir_grids="", outdir_txt2img_grids=str(tmp_path / "grids"),
                           outdir_samples="", outdir_txt2img_samples=str(tmp_path / "samples"), data={})
    shared = SimpleNamespace(state=standin.state, opts=opts, sd_model=object(),
                             cmd_opts=SimpleNamespace(lora_dir=str(lora_dir or tmp_path)))

    def process_images(pc):
        standin.prompts.append(pc.prompt)
        standin.seeds.append(pc.seed)
        standin.cells.append({"prompt": pc.prompt, "seed": pc.seed, "steps": pc.steps, "size": (pc.width, pc.height),
                              "sampler": pc.sampler_name, "addnet": getattr(pc, "addnet", None)})
        if standin.on_cell is not None:
            standin.on_cell(len(standin.prompts))
        shade = 0 if len(standin.prompts) in standin.nan_cells else 1 + sum(pc.prompt.encode()) % 255
        return SimpleNamespace(images=[Image.new("RGB", (8, 8), (shade, 0, 0))], seed=pc.seed, infotexts=[pc.prompt])
    standin.process_images = process_images
    if xyz_module.process_images is None:
        xyz_module.process_images, xyz_module.state = process_images, standin.state

    class Processing:
        def __init__(self, **kw):
            self.is_api = False
            self.scripts_value = self.script_args_value = None
            self.setup_done = False
            self.closed = False
            self.standin = standin
            self.negative_prompt = ""
            for k, v in kw.items():
                setattr(self, k, v)

        @property
        def scripts(self):
            return self.scripts_value

        @scripts.setter
        def scripts(self, value):
            self.scripts_value = value
            self._maybe_setup()

        @property
        def script_args(self):
            return self.script_args_value

        @script_args.setter
        def script_args(self, value):
            self.script_args_value = value
            self._maybe_setup()

        def _maybe_setup(self):
            if self.scripts_value and self.script_args_value and not self.setup_done:
                self.setup_done = True
                self.scripts_value.setup_scrips(self, is_ui=not self.is_api)

        def close(self):
            self.closed = True

    # The real dataclass takes these keywords (a subset suffices here), `scheduler` among them since 1.9.
    def txt2img(sd_model=None, outpath_samples="", outpath_grids="", prompt="", negative_prompt="", seed=-1,
                sampler_name="", steps=20, cfg_scale=7.0, width=512, height=512, batch_size=1, n_iter=1,
                scheduler=None):
        return Processing(sd_model=sd_model, outpath_samples=outpath_samples, outpath_grids=outpath_grids,
                          prompt=prompt, negative_prompt=negative_prompt, seed=seed, sampler_name=sampler_name,
                          steps=steps, cfg_scale=cfg_scale, width=width, height=height, batch_size=batch_size,
                          n_iter=n_iter, scheduler=scheduler)

    entry = SimpleNamespace(path="/webui/scripts/xyz_grid.py", module=xyz_module)
    scripts = SimpleNamespace(scripts_data=[SimpleNamespace(path="/webui/scripts/prompts_from_file.py",
                                                            module=types.ModuleType("pff")), entry],
                              scripts_txt2img=None)
    if before_ui is not None:
        before_ui(scripts)
    script = xyz_module.Script()
    runner = RunnerStandIn(script)
    scripts.scripts_txt2img = runner
    processing = SimpleNamespace(StableDiffusionProcessingTxt2Img=txt2img, process_images=process_images)
    call_queue = SimpleNamespace(queue_lock=FIFOLockStandIn())
    return SimpleNamespace(shared=shared, scripts=scripts, processing=processing, call_queue=call_queue,
                           networks=(lambda: networks) if networks is not None else (lambda: None),
                           standin=standin, script=script, runner=runner, xyz=xyz_module)
