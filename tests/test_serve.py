"""The serve binary (mmt_jax/serve.py), started as a user starts it (`mmt-jax serve`): its JSON
endpoint gives the Predictor's answers, bad requests get a 4xx naming the field while the server
keeps serving, concurrent requests each get their own product's answers, and the page works in a
real headless browser (Debian's Chromium, which .ci/run installs)."""
import concurrent.futures
import math
import os
import select
import shutil
import subprocess
import sys
import time

import jax
import pytest
import requests

from mmt_jax import acceptance
from mmt_jax.checkpoints import store
from mmt_jax.data import catalog
from mmt_jax.image_spec import ImagePreprocessing
from mmt_jax.model import EncoderDecoderModel
from mmt_jax.models.config import ModelConfig
from mmt_jax.models.contrastive import ContrastiveConfig
from mmt_jax.models.mmt4 import FusionConfig
from mmt_jax.models.t5 import t5_config

PROMPTS = ("color:", "pattern:", "match:")  # what the checkpoint records it was trained on
INPUT_LENGTH = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MMT4 with the contrastive head over 16-px images (random weights: the answers are
    arbitrary but deterministic), calibrated for colour only."""
    config = ModelConfig(t5_config("tiny", vocab_size=896, emb_dim=32, num_heads=2, head_dim=16,
                                   mlp_dim=64, num_encoder_layers=1, num_decoder_layers=1),
                         FusionConfig(patch_size=8), image=ImagePreprocessing(size=16),
                         contrastive=ContrastiveConfig(dim=8), prompts=PROMPTS)
    model = EncoderDecoderModel(config.module())
    shapes = {"encoder_input_tokens": (2, INPUT_LENGTH), "encoder_images": (2, 16, 16, 3),
              "encoder_image_mask": (2,), "decoder_input_tokens": (2, 4),
              "decoder_target_tokens": (2, 4), "pair_text_tokens": (2, 8), "pair_label": (2,)}
    params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
        jax.random.PRNGKey(3))["params"]
    path = store.save_checkpoint(str(tmp_path_factory.mktemp("serve") / "checkpoint_1"), params,
                                 config)
    acceptance.save(path, {"open": {"color:": -1e9}}, "validation")  # every colour accepted
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """`mmt-jax serve` on a free port, with a 1 MB upload limit: its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mmt_jax.main", "serve", "--checkpoint", checkpoint, "--port", "0",
         "--input-length", str(INPUT_LENGTH), "--target-length", "4", "--max-upload-mb", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 1.0)[0]:
            lines.append(process.stdout.readline())
            if lines[-1].startswith("serving on "):
                break
    else:
        process.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    url = lines[-1].split()[2]
    yield url
    process.terminate()
    assert process.wait(timeout=30) is not None


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from mmt_jax.predictor import Predictor
    return Predictor.from_checkpoint(checkpoint, input_length=INPUT_LENGTH, target_length=4,
                                     batch_size=2)


def _product(index):
    return catalog.make_product(index, seed=11, image_size=32)


def _post(url, product, **fields):
    files = {"image": ("photo.jpg", product.image, "image/jpeg")} if product else {}
    data = {"title": product.title} if product else {}
    return requests.post(url + "api/attributes", files=files, data={**data, **fields}, timeout=120)


def test_the_endpoint_answers_as_the_predictor(server, predictor):
    product = _product(0)
    response = _post(server, product)
    assert response.status_code == 200, response.text
    body = response.json()
    # the attribute prompts the checkpoint was trained on: matching is not an attribute
    assert [a["prompt"] for a in body["attributes"]] == ["color:", "pattern:"]
    for answer in body["attributes"]:
        direct = predictor.predict(image=product.image, title=product.title,
                                   prompt=answer["prompt"])
        assert answer["attribute"] == answer["prompt"][:-1]
        assert answer["value"] == direct.text
        assert answer["score"] == pytest.approx(direct.score, abs=1e-5)
        assert answer["probability"] == pytest.approx(math.exp(direct.score), rel=1e-5)
        assert answer["source_weights"] is None
    # calibrated for colour only: accepted (threshold -1e9), no threshold for pattern
    assert [a["accepted"] for a in body["attributes"]] == [True, None]
    assert body["match"] == pytest.approx(
        predictor.match(image=product.image, title=product.title), abs=1e-5)
    info = requests.get(server + "api/info", timeout=30).json()
    assert info["prompts"] == ["color:", "pattern:"] and info["reads_images"]


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"product": None, "title": "a red shirt"}, 400, "field 'image': missing"),
    ({"image": b"\x89PNG not really"}, 400, "field 'image': corrupt"),
    ({"titel": "a red shirt"}, 400, "unknown field 'titel'"),
    ({"title": "long " * 40}, 400, "more than input_length=24"),
    ({"image": b"\xff" * (50 * 2 ** 20)}, 413, "larger than this server's limit of 1 MB"),
])
def test_a_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, request_kwargs,
                                                                     status, message):
    kwargs = dict(request_kwargs)
    product = kwargs.pop("product", _product(1))
    image = kwargs.pop("image", None)
    if image is not None:
        response = requests.post(server + "api/attributes", timeout=120,
                                 files={"image": ("photo.jpg", image, "image/jpeg")},
                                 data={"title": "a shirt"})
    else:
        response = _post(server, product, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _post(server, _product(2)).status_code == 200


def test_wrong_method_and_path_are_json_errors(server):
    response = requests.get(server + "api/attributes", timeout=30)
    assert response.status_code == 405 and "error" in response.json()
    assert requests.get(server + "nowhere", timeout=30).status_code == 404


def test_concurrent_requests_each_get_their_own_products_answers(server):
    products = [_product(i) for i in range(3, 9)]
    alone = [_post(server, p).json() for p in products]
    with concurrent.futures.ThreadPoolExecutor(len(products)) as pool:
        together = list(pool.map(lambda p: _post(server, p).json(), products))
    assert together == alone


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through its chromedriver (Debian's chromium and chromium-driver)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("MMT_JAX_REQUIRE_BROWSER"):
            pytest.fail("MMT_JAX_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--window-size=1000,700"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(driver))
    yield session
    session.quit()


def test_the_page_in_a_headless_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait
    product = _product(0)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(product.image)
    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "color: pattern:" in b.find_element(By.ID, "info").text)
    browser.find_element(By.ID, "image").send_keys(str(photo))
    browser.find_element(By.ID, "title").send_keys(product.title)
    browser.find_element(By.ID, "submit").click()
    wait.until(ready.visibility_of_element_located((By.ID, "attributes")))
    rows = browser.find_elements(By.CSS_SELECTOR, "#attributes tbody tr")
    assert len(rows) == 2
    shown = {row.get_attribute("data-attribute"): row.find_element(By.CLASS_NAME, "value").text
             for row in rows}
    expected = {a["attribute"]: a["value"] for a in _post(server, product).json()["attributes"]}
    assert shown == expected
    assert browser.find_element(By.ID, "match").text.startswith("image-title match")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 0

    # a file that is not an image: the page shows the server's message, and then still works
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not an image at all")
    browser.find_element(By.ID, "image").clear()
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda b: "field 'image': corrupt" in b.find_element(By.ID, "error").text)
    browser.find_element(By.ID, "image").clear()
    browser.find_element(By.ID, "image").send_keys(str(photo))
    browser.find_element(By.ID, "submit").click()
    wait.until(ready.visibility_of_element_located((By.ID, "attributes")))
    assert browser.find_element(By.ID, "error").text == ""
    assert {row.get_attribute("data-attribute"): row.find_element(By.CLASS_NAME, "value").text
            for row in browser.find_elements(By.CSS_SELECTOR, "#attributes tbody tr")} == expected
