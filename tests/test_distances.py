"""Planning `percept distance` jobs from inputs alone, and computing them."""

from __future__ import annotations

import pytest
import torch

from percept_cli import distances, load_metric
from percept_cli.errors import BadInputError, ImageReadError


def test_modes(image_dir, tmp_path):
    a, b, c = (str(image_dir / f"{n}.png") for n in "abc")
    assert distances.plan_job([a, b]).mode == "pair"
    job = distances.plan_job([a, b, c])
    assert job.mode == "rank" and job.candidates == [b, c]
    job = distances.plan_job([a, str(image_dir)])
    assert job.mode == "rank" and job.candidates == [str(image_dir / f"{n}.png") for n in "bcde"]  # no reference
    job = distances.plan_job([str(image_dir)])
    assert job.mode == "matrix" and job.rows == job.cols and job.row_names[0] == "a.png"
    other = tmp_path / "other"
    other.mkdir()
    (image_dir / "a.png").rename(other / "x.png")
    job = distances.plan_job([str(image_dir), str(other)])
    assert (len(job.rows), len(job.cols)) == (4, 1)


@pytest.mark.parametrize("args, message", [
    ([], "no images given"),
    (["IMG"], "needs a second image"),
    (["DIR", "IMG"], "one or two directories"),
    (["IMG", "missing.png"], "file not found"),
])
def test_bad_combinations(image_dir, args, message):
    mapping = {"IMG": str(image_dir / "a.png"), "DIR": str(image_dir), "missing.png": str(image_dir / "zz.png")}
    with pytest.raises(BadInputError, match=message):
        distances.plan_job([mapping[a] for a in args])


def test_pairs_csv_header_and_relative_paths(image_dir):
    csv_path = image_dir / "pairs.csv"
    csv_path.write_text("image_a,image_b\na.png,b.png\nc.png,d.png\n")
    pairs = distances.read_pairs_csv(csv_path)
    assert pairs == [(str(image_dir / "a.png"), str(image_dir / "b.png")),
                     (str(image_dir / "c.png"), str(image_dir / "d.png"))]
    csv_path.write_text("a.png,b.png\n")
    assert len(distances.read_pairs_csv(csv_path)) == 1
    csv_path.write_text("only-one-column\n")
    with pytest.raises(BadInputError, match="two columns"):
        distances.read_pairs_csv(csv_path)


def test_each_file_embedded_once(tiny_vit, image_dir):
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    seen = []
    original = metric.embed_files
    metric.embed_files = lambda files, **kw: (seen.append(list(files)), original(files, **kw))[1]
    a, b = str(image_dir / "a.png"), str(image_dir / "b.png")
    job = distances.DistanceJob("pairs", pairs=[(a, b), (b, a), (a, a)])
    result = distances.run_job(metric, job)
    assert seen == [[a, b]]
    d = [r["distance"] for r in result.records]
    assert d[0] == pytest.approx(d[1], abs=1e-6) and abs(d[2]) < 1e-6


def test_rank_order_and_values(tiny_vit, image_dir):
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    result = distances.run_job(metric, distances.plan_job([files[0], *files[1:]]))
    values = [r["distance"] for r in result.records]
    assert values == sorted(values)
    expected = metric.distance(files[0], [r["b"] for r in result.records])
    torch.testing.assert_close(torch.tensor(values), expected.cpu(), atol=1e-5, rtol=0)


def test_check_files_and_first_failure(image_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("x")
    failures = distances.check_files([str(image_dir / "a.png"), str(bad), str(bad)])
    assert len(failures) == 2
    err = distances.first_failure_error(failures)
    assert isinstance(err, ImageReadError) and "1 more" in str(err)
    assert "--skip-bad" not in str(err) and "--skip-bad" in err.option_hints  # the CLI adds it where it exists


def test_rank_lists_each_candidate_once_and_never_the_reference(image_dir, tmp_path):
    a, b, c = (str(image_dir / f"{n}.png") for n in "abc")
    link = tmp_path / "link-to-b.png"
    link.symlink_to(image_dir / "b.png")
    dotted = str(image_dir / ".." / image_dir.name / "c.png")
    job = distances.plan_job([a, b, str(image_dir), dotted, str(link), str(image_dir / ".." / image_dir.name)])
    expected = [b, str(image_dir / "c.png"), str(image_dir / "d.png"), str(image_dir / "e.png")]
    assert job.mode == "rank" and job.candidates == expected  # first spelling kept, reference (a) left out
    with pytest.raises(BadInputError, match="every candidate is the reference"):
        distances.plan_job([a, str(tmp_path / ".." / tmp_path.name / "images" / "a.png"), a])
    assert c in job.candidates


def _ranked(records):
    return [(r["rank"], r["b"], r["distance"]) for r in records]


def test_top_and_threshold_select_the_nearest(tiny_vit, image_dir):
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    job = distances.plan_job(files)
    full = distances.run_job(metric, job).records
    assert len(full) == 4 and files[0] not in [r["b"] for r in full]
    top2 = distances.run_job(metric, job, top=2).records
    assert _ranked(top2) == _ranked(full[:2])
    cut = (full[1]["distance"] + full[2]["distance"]) / 2  # between the 2nd and 3rd nearest
    near = distances.run_job(metric, job, threshold=cut).records
    assert _ranked(near) == _ranked(full[:2]) and all(r["distance"] <= cut for r in near)
    assert distances.run_job(metric, job, threshold=cut, top=1).records == full[:1]
    assert distances.run_job(metric, job, threshold=0.0).records == []
    with pytest.raises(BadInputError, match="top must be at least 1"):
        distances.run_job(metric, job, top=0)
    with pytest.raises(BadInputError, match="ranking"):
        distances.run_job(metric, distances.plan_job(files[:2]), top=1)


def test_identical_files_are_exactly_zero_and_distances_in_0_2(tiny_vit, image_dir):
    metric = load_metric(str(tiny_vit[0]), device="cpu")
    files = [str(image_dir / f"{n}.png") for n in "abcde"]
    pairs = distances.run_job(metric, distances.DistanceJob("pairs", pairs=[(f, f) for f in files]))
    assert [r["distance"] for r in pairs.records] == [0.0] * 5
    matrix = distances.run_job(metric, distances.plan_job([str(image_dir)])).matrix
    assert torch.equal(matrix.diagonal(), torch.zeros(5)) and float(matrix.min()) >= 0.0
    assert float(matrix.max()) <= 2.0
