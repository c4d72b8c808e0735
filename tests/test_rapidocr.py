"""The `ocr` reward on a real OCR engine: RapidOCR (rapidocr-onnxruntime, in the test extra; its PP-OCRv4 models
ship inside the wheel) reads text drawn with PIL back, and the engine choice and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from opd_fast.evaluate import rewards
from opd_fast.evaluate.base import RewardError
from opd_fast.evaluate.registry import REWARDS, build_reward

FONTS = [
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),  # Debian/Ubuntu's fonts-dejavu-core
    Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"),  # Fedora
]


def font(size: int):
    """A TrueType font: the system's DejaVu Sans, else matplotlib's copy, else Pillow's own scalable default."""
    candidates = list(FONTS)
    try:
        import matplotlib

        candidates.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable font (with FreeType)


def sign(text: str, size: int = 320) -> Image.Image:
    """Black text on white, like a rendered sign; blank when text is empty."""
    image = Image.new("RGB", (size, size // 2), "white")
    if text:
        ImageDraw.Draw(image).text((16, size // 8), text, fill="black", font=font(40))
    return image


@pytest.fixture(scope="module")
def rapidocr():
    return build_reward("ocr", engine="rapidocr", device="cpu")


def test_rapidocr_reads_drawn_text_back(rapidocr):
    prompts = ['a sign that says "OPEN DAILY"', 'a sign that says "OPEN DAILY"', 'a mug with "coffee"']
    images = [sign("OPEN DAILY"), sign(""), sign("Sunflower")]
    drawn, blank, other = rapidocr.score(images, prompts, [{}, {}, {}])
    assert drawn >= 0.9
    assert blank == 0.0  # nothing read: the whole target is missing
    assert other <= 0.5
    # metadata "text" wins over the prompt's quotes, as for the PaddleOCR engine
    assert rapidocr.score([sign("Sunflower")], ['a sign that says "nothing"'], [{"text": "Sunflower"}]) == [
        pytest.approx(1.0)
    ]


def test_the_default_engine_is_rapidocr_unless_paddleocr_model_folders_are_given(tmp_path):
    assert build_reward("ocr", device="cpu").engine == "rapidocr"
    if rewards.OCR.unavailable("paddleocr") is not None:
        with pytest.raises(RewardError, match=r"engine 'paddleocr' needs the Python package 'paddleocr'"):
            build_reward("ocr", det_model_dir=str(tmp_path), rec_model_dir=str(tmp_path))


def test_engine_options_and_availability(monkeypatch, tmp_path):
    with pytest.raises(RewardError, match=r"unknown engine 'tesseract' \(known: rapidocr, paddleocr\)"):
        build_reward("ocr", engine="tesseract")
    with pytest.raises(RewardError, match="det_model_dir/rec_model_dir are paddleocr's"):
        build_reward("ocr", engine="rapidocr", det_model_dir=str(tmp_path))
    assert REWARDS["ocr"].unavailable() is None and REWARDS["ocr"].unavailable("rapidocr") is None

    monkeypatch.setattr(rewards, "_installed", lambda engine: False)  # a machine with neither engine
    reason = REWARDS["ocr"].unavailable()
    assert "'rapidocr_onnxruntime' (pip install rapidocr-onnxruntime" in reason and "or 'paddleocr' (pip" in reason
    with pytest.raises(RewardError, match="reward 'ocr' needs the Python package 'rapidocr_onnxruntime'"):
        build_reward("ocr")
