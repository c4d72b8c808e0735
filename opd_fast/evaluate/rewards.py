"""Reward adapters for evaluation: each a registered `Reward` (opd_fast.evaluate.base) with
`score(images, prompts, metadata)`; opd_fast.evaluate.registry builds them by name.

Every adapter loads its models from local files only (options name the paths) and says precisely what is missing
when its package is not installed (`Reward.unavailable()`), so `opd-fast eval` fails before any scoring starts.

    pickscore    PickScore_v1 (a CLIP-H): logit_scale * cos(image, prompt), / 26 as Flow-GRPO reports it
    clipscore    any CLIP: 100 * max(cos(image, prompt), 0) (torchmetrics' CLIPScore)
    aesthetic    LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding -> linear MLP head
    hpsv2        HPS v2.1: open_clip ViT-H-14 with the HPS checkpoint, cos(image, prompt)   [needs open_clip]
    imagereward  ImageReward v1.0 (BLIP)                                                    [needs image-reward]
    ocr          1 - normalized edit distance between the quoted text and the OCR reading [rapidocr or paddleocr]
    geneval      GenEval's object/count/color/position rules (opd_fast.evaluate.geneval)   [needs mmdet]

The CLIP-based ones run on transformers' CLIPModel, so they are tested here on tiny random CLIPs built from config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd_fast.evaluate.base import ClipReward, Reward, RewardError, register


@register("pickscore")
class PickScore(ClipReward):
    """PickScore (Kirstain et al. 2023): model = the PickScore_v1 folder, processor = the
    CLIP-ViT-H-14-laion2B-s32B-b79K folder (PickScore_v1 ships no processor). scale 1/26 is Flow-GRPO's
    normalization (the paper's tables); scale 1 gives the raw PickScore (~22)."""

    def __init__(
        self,
        model: str | None = None,
        processor: str | None = None,
        scale: float = 1 / 26,
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(model, processor, device, batch_size)
        self.scale = scale

    def score(self, images, prompts, metadata):
        logit_scale = self.model.logit_scale.exp().item()
        return (self.cosines(images, prompts) * logit_scale * self.scale).tolist()


@register("clipscore")
class ClipScore(ClipReward):
    """CLIPScore as torchmetrics computes it: 100 * max(cos, 0), with e.g. openai/clip-vit-large-patch14."""

    def score(self, images, prompts, metadata):
        return (100 * self.cosines(images, prompts).clamp(min=0)).tolist()


@register("aesthetic")
class Aesthetic(ClipReward):
    """LAION's improved aesthetic predictor: model = the openai/clip-vit-large-patch14 folder, head = the
    sac+logos+ava1-l14-linearMSE.pth (or .safetensors) file. The head is the predictor's MLP: Linear layers
    `layers.{i}` applied in order with no activation (its dropouts are identities at inference)."""

    def __init__(
        self,
        model: str | None = None,
        head: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(model, processor, device, batch_size)
        from opd_fast.safeio import load_tensors

        state = load_tensors(self._local("head", head, "file"), "reward 'aesthetic' head")
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
        if not indices:
            raise RewardError(f"reward 'aesthetic': {head} holds no layers.N.weight (not the LAION MLP head)")
        self.layers = [
            (state[f"layers.{i}.weight"].float().to(self.device), state[f"layers.{i}.bias"].float().to(self.device))
            for i in indices
        ]
        embed_dim = self.model.config.projection_dim
        if self.layers[0][0].shape[1] != embed_dim or self.layers[-1][0].shape[0] != 1:
            raise RewardError(
                f"reward 'aesthetic': the head maps {self.layers[0][0].shape[1]} -> "
                f"{self.layers[-1][0].shape[0]} but the CLIP embeds {embed_dim} (expects -> 1)"
            )

    def score(self, images, prompts, metadata):
        out = []
        for idx in self._batches(len(images)):
            h = self.image_embeds([images[i] for i in idx])
            for weight, bias in self.layers:
                h = torch.nn.functional.linear(h, weight, bias)
            out.append(h[:, 0].cpu())
        return torch.cat(out).tolist()


# ---------------------------------------------------------------------------------------------------------------
# rewards on other packages: written against their APIs, detected at run time


@register("hpsv2")
class HPSv2(Reward):
    """HPS v2.1 (Wu et al. 2023) the way the hpsv2 package scores, without its downloads: open_clip's ViT-H-14,
    the HPS_v2.1_compressed.pt checkpoint (`checkpoint`), score = image_features . text_features (unit norm)."""

    requires = ("open_clip",)
    install_hint = "pip install open_clip_torch, with the torchvision that matches your torch build"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_name: str = "ViT-H-14",
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device, batch_size)
        import open_clip

        path = self._local("checkpoint", checkpoint, "file")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None, device=self.device
        )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)  # its BPE vocabulary ships inside open_clip

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        out = []
        for idx in self._batches(len(images)):
            pixels = torch.stack([self.preprocess(images[i]) for i in idx]).to(self.device)
            text = self.tokenizer([prompts[i] for i in idx]).to(self.device)
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(text, normalize=True)
            out.append((img * txt).sum(-1).float().cpu())
        return torch.cat(out).tolist()


@register("imagereward")
class ImageReward(Reward):
    """ImageReward v1.0 (Xu et al. 2023): checkpoint = ImageReward.pt, med_config = its med_config.json. The
    package also reads the bert-base-uncased tokenizer through the Hugging Face cache: have it there and set
    HF_HUB_OFFLINE=1."""

    requires = ("ImageReward",)
    install_hint = "pip install image-reward, with the torchvision that matches your torch build"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device, batch_size)
        import ImageReward as RM

        self.model = RM.load(
            str(self._local("checkpoint", checkpoint, "file")),
            device=str(self.device),
            med_config=str(self._local("med_config", med_config, "file")),
        )

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        return [float(self.model.score(prompt, image)) for image, prompt in zip(images, prompts)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of one character each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward: spaces dropped and case folded; 1 if the target appears in the reading, else
    1 - edit_distance / len(target), floored at 0."""
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return 0.0
    if target in recognized:
        return 1.0
    return 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


# OCR engines: name -> (module to import, how to install). Both run PP-OCR's detection + recognition models.
OCR_ENGINES = {
    "rapidocr": ("rapidocr_onnxruntime", "pip install rapidocr-onnxruntime (its PP-OCRv4 models ship in the wheel)"),
    "paddleocr": (
        "paddleocr",
        "pip install paddleocr paddlepaddle (or paddlepaddle-gpu), plus its det/rec model folders",
    ),
}


def _installed(engine: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(OCR_ENGINES[engine][0]) is not None


@register("ocr")
class OCR(Reward):
    """Text rendering accuracy: the prompt's quoted text (datasets.ocr_target; metadata "text" when present) against
    what an OCR engine reads, scored by Flow-GRPO's rule (ocr_reward).

    engine: "paddleocr" (Flow-GRPO's engine: its models load from the local folders `det_model_dir` and
    `rec_model_dir`), or "rapidocr" (rapidocr-onnxruntime: the same PP-OCR family on onnxruntime, models inside
    the wheel, nothing to download). Default: paddleocr when its model folders are given, else rapidocr if it is
    installed, else paddleocr (whose error then says what is missing). Numbers meant to compare with the paper's
    come from paddleocr. `recognizer` (a callable image -> text) replaces both, e.g. for another OCR engine."""

    @classmethod
    def unavailable(cls, engine: str | None = None) -> str | None:
        """Why `engine` (default: either engine) cannot run here, or None."""
        engines = [engine] if engine else list(OCR_ENGINES)
        if any(_installed(e) for e in engines):
            return None
        needs = " or ".join(f"{OCR_ENGINES[e][0]!r} ({OCR_ENGINES[e][1]})" for e in engines)
        return f"reward 'ocr'{f' engine {engine!r}' if engine else ''} needs the Python package {needs}"

    def __init__(
        self,
        engine: str | None = None,
        det_model_dir: str | None = None,
        rec_model_dir: str | None = None,
        recognizer=None,
        device: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(device, batch_size)
        if recognizer is not None:
            self.recognize = recognizer
            return
        if engine is None:
            paddle_dirs = det_model_dir is not None or rec_model_dir is not None
            engine = "rapidocr" if not paddle_dirs and _installed("rapidocr") else "paddleocr"
        if engine not in OCR_ENGINES:
            raise RewardError(f"reward 'ocr': unknown engine {engine!r} (known: {', '.join(OCR_ENGINES)})")
        reason = self.unavailable(engine)
        if reason:
            raise RewardError(reason)
        self.engine = engine
        if engine == "rapidocr":
            if det_model_dir is not None or rec_model_dir is not None:
                raise RewardError("reward 'ocr': det_model_dir/rec_model_dir are paddleocr's; rapidocr uses its own")
            self.recognize = _rapid_recognizer(self.device)
        else:
            self.recognize = _paddle_recognizer(
                self._local("det_model_dir", det_model_dir, "dir"),
                self._local("rec_model_dir", rec_model_dir, "dir"),
                self.device,
            )

    def score(self, images, prompts, metadata):
        from opd_fast.datasets import ocr_target

        scores = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            target = (metadata[i] if metadata else {}).get("text") or ocr_target(prompt)
            if target is None:
                raise RewardError(f"reward 'ocr': prompt {i} has no quoted text to read: {prompt!r}")
            scores.append(ocr_reward(self.recognize(image), target))
        return scores


def _rapid_recognizer(device: torch.device):
    """image -> the concatenated text RapidOCR reads, top to bottom, like the PaddleOCR adapter: no angle classifier
    and every line with a positive confidence (RapidOCR drops lines under 0.5 by default; Flow-GRPO keeps them)."""
    import onnxruntime
    from rapidocr_onnxruntime import RapidOCR

    cuda = device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    engine = RapidOCR(use_cls=False, text_score=0.0, det_use_cuda=cuda, rec_use_cuda=cuda, cls_use_cuda=cuda)

    def recognize(image) -> str:
        lines, _ = engine(image.convert("RGB"))  # a PIL image: RapidOCR converts it to its BGR itself
        return "".join(text for _, text, conf in lines or [] if float(conf) > 0)

    return recognize


def _paddle_recognizer(det_dir: Path, rec_dir: Path, device: torch.device):
    """image -> the concatenated text PaddleOCR reads (lines with a positive confidence), for paddleocr 3.x
    (predict API) and 2.x (ocr API)."""
    import numpy as np
    import paddleocr

    major = int(getattr(paddleocr, "__version__", "3").split(".")[0])
    if major >= 3:
        engine = paddleocr.PaddleOCR(
            text_detection_model_dir=str(det_dir),
            text_recognition_model_dir=str(rec_dir),
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            device="gpu" if device.type == "cuda" else "cpu",
        )

        def recognize(image) -> str:
            result = engine.predict(np.asarray(image.convert("RGB")))
            return "".join(t for r in result for t, s in zip(r["rec_texts"], r["rec_scores"]) if s > 0)
    else:
        engine = paddleocr.PaddleOCR(
            det_model_dir=str(det_dir),
            rec_model_dir=str(rec_dir),
            use_angle_cls=False,
            lang="en",
            use_gpu=device.type == "cuda",
            show_log=False,
        )

        def recognize(image) -> str:
            lines = engine.ocr(np.asarray(image.convert("RGB")), cls=False)[0] or []
            return "".join(text for _, (text, conf) in lines if conf > 0)

    return recognize
