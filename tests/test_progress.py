"""The progress helper (falkon_convrfm.progress): bars only inside an estimator call with
progress=True, work reported to the innermost phase of its unit, chunks only while a bar shows."""
import pytest

import falkon_convrfm.progress as progress


class Model:
    def __init__(self, progress):
        self.progress = progress

    @progress.scoped
    def run(self, work):
        return work()


@pytest.fixture(autouse=True)
def no_delay(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0.0)


def phases():
    with progress.phase("solve", 100) as outer:
        with progress.phase("encode", 10, "img") as inner:
            progress.advance(30)  # kernel entries: the outer phase, past the image bar
            progress.advance(4, "img")
            rows = progress.progress_rows(10_000)
        return outer.n, inner.n, rows


def test_work_goes_to_the_innermost_phase_of_its_unit(capfd):
    assert Model(True).run(phases) == (30, 4, 256)
    err = capfd.readouterr().err
    assert "solve" in err and "encode" in err and "entries/s" in err


def test_nothing_is_drawn_without_progress(capfd):
    assert Model(False).run(phases)[2] == 10_000  # no bar drawn: one chunk
    assert phases()[2] == 10_000  # outside an estimator call: the same
    list(progress.steps(range(3), "loop", leave=True))
    assert capfd.readouterr() == ("", "")


def test_advance_without_a_phase_is_a_no_op():
    progress.advance(5)
    assert progress.progress_rows(7) == 7
