"""The web page in a real browser: headless Chromium (Debian's package, driven by chromedriver through selenium)
opens the page on 127.0.0.1, types a prompt, clicks Generate, and an image of the model's size must appear. The
screenshot is kept in build/test-artifacts/ (or $TOKENPAINT_TEST_ARTIFACTS)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("gradio")

from serve_helpers import LiveServer, make_runs  # noqa: E402
from tokenpaint import Pipeline  # noqa: E402
from tokenpaint.serve import ServeSettings, create_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("TOKENPAINT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "build" /
                                "test-artifacts"))


def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing = "selenium"
    else:
        missing = None if CHROMIUM and CHROMEDRIVER else "chromium / chromedriver (apt-get install chromium " \
                                                         "chromium-driver)"
    if missing:
        if os.environ.get("CI"):  # .ci/run installs them: in CI this test must run
            pytest.fail(f"{missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='tokenpaint-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run = make_runs(tmp_path_factory.mktemp("serve_ui"))["mim"]
    pipe = Pipeline.from_pretrained(run)
    server = LiveServer(create_app(pipe, ServeSettings(max_wait_ms=0), model_dir=run, ui=True))
    yield pipe, server
    server.stop()


def test_page_generates_an_image_of_the_model_size(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, server = page
    driver = browser()
    try:
        driver.get(server.url + "/")
        prompt = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys("a red circle on a white background")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def loaded_images(d):
            sizes = [d.execute_script("return arguments[0].complete && [arguments[0].naturalWidth, "
                                      "arguments[0].naturalHeight]", img)
                     for img in d.find_elements(By.CSS_SELECTOR, "#gallery img")]
            return [s for s in sizes if s] or None

        sizes = WebDriverWait(driver, 60).until(loaded_images)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve_ui.png"))
        assert sizes[0] == [pipe.resolution, pipe.resolution]
        seeds = driver.find_element(By.CSS_SELECTOR, "#seeds textarea").get_attribute("value")
        assert len(seeds.split(",")) == len(sizes) == 4  # the default number of images, and the seeds used
    finally:
        driver.quit()


def test_edit_tab_inpaints_like_the_pipeline(page, tmp_path):
    """The edit tab through gradio's own client: an uploaded image and mask give Pipeline.edit's images."""
    from gradio_client import Client, handle_file
    from PIL import Image

    pipe, server = page
    side = pipe.resolution
    image = Image.new("RGB", (side, side), (200, 20, 20))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side, side // 2))
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    client = Client(server.url + "/", verbose=False, download_files=str(tmp_path / "out"))
    gallery, seeds = client.predict({"background": handle_file(str(tmp_path / "image.png")), "layers": [],
                                     "composite": None}, handle_file(str(tmp_path / "mask.png")), "inpaint", 0.6,
                                    "a green square", "", 2, 5, 2.0, 4, 32, 1.0, api_name="/edit")
    assert seeds == "5, 6"
    expected = pipe.edit("a green square", image, mask=mask, mode="inpaint", seed=5, num_images=2, steps=4,
                         guidance_scale=2.0, temperature=1.0)
    got = [Image.open(item["image"]).convert("RGB") for item in gallery]
    assert [g.tobytes() for g in got] == [e.tobytes() for e in expected]
