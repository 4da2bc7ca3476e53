"""Two builds sharing one --sample folder: one maker at a time, a complete sample reused, and never a remake under a
build that is downloading from it."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from curation.build import user_error_message
from curation.sample import make_sample
from curation.sample.lock import SampleInUse
from curation.sample.server import SampleImageServer

MAKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import LexicalExtractor
    import curation.sample.make as make
    real = make._render
    def render(*args, **kwargs):
        print("RENDERED", flush=True)
        time.sleep(1.0)  # long enough for the other maker to arrive while this one holds the lock
        return real(*args, **kwargs)
    make._render = render
    info = make.make_sample({folder!r}, n_rows=40, image_size=32, extractor=LexicalExtractor(), eval_images=2,
                            eval_selection_images=0)
    print("ROWS", info.n_rows, flush=True)
""")


def test_two_concurrent_makers_render_the_sample_once_and_both_use_it(tmp_path):
    folder = tmp_path / "sample"
    code = MAKER.format(tests=str(__import__("pathlib").Path(__file__).parent), folder=str(folder))
    makers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outputs = [m.communicate(timeout=300) for m in makers]
    assert [m.returncode for m in makers] == [0, 0], [o[1][-2000:] for o in outputs]
    stdout = [o[0] for o in outputs]
    assert sum(out.count("RENDERED") for out in stdout) == 1, stdout  # the second reused the first one's sample
    assert all("ROWS 40" in out for out in stdout)
    assert len(list((folder / "images").glob("*.jpg"))) > 0 and not (folder / ".staging").exists()


def test_a_sample_being_served_is_never_remade_under_the_build(tmp_path, lexical_extractor):
    folder = tmp_path / "sample"
    info = make_sample(folder, n_rows=30, image_size=32, extractor=lexical_extractor, eval_images=2,
                       eval_selection_images=0)
    images = sorted(p.name for p in info.images_dir.glob("*.jpg"))
    marker = (folder / "sample.json").read_bytes()
    with SampleImageServer(folder):
        # The same sample: reused at once, even while served.
        assert make_sample(folder, n_rows=30, image_size=32, extractor=lexical_extractor, eval_images=2,
                           eval_selection_images=0).n_rows == 30
        started = time.monotonic()
        with pytest.raises(SampleInUse) as err:  # other settings would replace the images the build downloads
            make_sample(folder, n_rows=50, image_size=32, extractor=lexical_extractor, eval_images=2,
                        eval_selection_images=0)
        assert time.monotonic() - started < 5
        message = user_error_message(err.value, None, str(tmp_path / "out"))
        assert message == str(err.value) and "\n" not in message and str(folder) in message
        assert sorted(p.name for p in info.images_dir.glob("*.jpg")) == images
        assert (folder / "sample.json").read_bytes() == marker
    remade = make_sample(folder, n_rows=50, image_size=32, extractor=lexical_extractor, eval_images=2,
                         eval_selection_images=0)
    assert remade.n_rows == 50
