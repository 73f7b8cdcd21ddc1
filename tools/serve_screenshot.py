"""The README's screenshot of `mmt-jax serve`: the page answering for one product, in headless
Chromium (Debian's chromium and chromium-driver; selenium from the test extra).

    .venv/bin/python tools/serve_screenshot.py --checkpoint runs/demo/mmt4 --out docs/serve.png

(after `mmt-jax demo` and the README's `mmt-jax eval` of runs/demo/mmt4, which calibrates acceptance)

The product is one the checkpoint never trained on: the embedded catalog's generator with another
seed, its title with the colour, pattern and sleeve type removed (as the main job's fine-tuning
saw titles), so the image is the only place to read them from.
"""
import argparse
import os
import re
import sys
import tempfile
import threading

from werkzeug import serving


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--product", type=int, default=11, help="index in the seed-99 catalog")
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from mmt_jax import serve
    from mmt_jax.checkpoints import store
    from mmt_jax.data import catalog
    from mmt_jax.predictor import Predictor

    checkpoint = store.resolve(args.checkpoint)
    prompts = serve.attribute_prompts(store.load_config(checkpoint).prompts)
    predictor = Predictor.from_checkpoint(checkpoint, input_length=64, target_length=8,
                                          batch_size=len(prompts))
    server = serving.make_server("127.0.0.1", 0, serve.create_app(
        predictor, prompts, name=args.checkpoint), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    product = catalog.make_product(args.product, seed=99, image_size=128)
    title = product.title
    for attribute in ("color", "pattern", "sleeve_type"):
        value = product.attributes.get(attribute)
        if value:
            title = " ".join(re.sub(rf"\b{re.escape(value)}\b", " ", title, flags=re.I).split())
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=900,680"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            photo = os.path.join(scratch, f"{product.id}.jpg")
            with open(photo, "wb") as f:
                f.write(product.image)
            browser.get(f"http://127.0.0.1:{server.server_port}/")
            browser.find_element(By.ID, "image").send_keys(photo)
            browser.find_element(By.ID, "title").send_keys(title)
            browser.find_element(By.ID, "description").send_keys(product.description)
            browser.find_element(By.ID, "submit").click()
            WebDriverWait(browser, 120).until(
                ready.visibility_of_element_located((By.ID, "attributes")))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            browser.save_screenshot(args.out)
        print(f"wrote {args.out}: {product.id} (true: "
              + ", ".join(f"{k} {v}" for k, v in sorted(product.attributes.items())) + ")")
    finally:
        browser.quit()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
