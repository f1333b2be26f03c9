"""Per-expert tasks on an executor (cosmoe_export/executors.py): the same bytes for every --jobs and
for a Ray cluster, file for file. quantize is checked with GPTQ and per-expert mixed precision on
calibration text (the tasks that take calibration tokens), lower with every target."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cosmoe_export import executors
from cosmoe_export.cli import cli
from cosmoe_export.errors import CosmoeError
from cosmoe_export.executors import ExecutorConfig
from tests.cosmoe_export.training.test_train import make_tiny_checkpoint, write_corpus


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under root (manifest included) -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained CoSMoE bundle (2 layers x 8 experts) and a calibration text."""
    tmp = tmp_path_factory.mktemp("parallel")
    ckpt = make_tiny_checkpoint(tmp, "moe", steps=3)
    bundle = tmp / "float"
    assert run("-q", "split", ckpt, "-o", bundle).exit_code == 0
    (tmp / "calib.txt").write_text(write_corpus(tmp / "all.txt").read_text()[:20_000])
    return {"tmp": tmp, "bundle": bundle, "calib": tmp / "calib.txt"}


# GPTQ everywhere, and with "auto" the mixed-precision scoring of every expert before it.
GPTQ = ("--expert-scheme", "int4", "--rounding", "gptq")
AUTO = ("--expert-bits", "auto", "--rounding", "gptq", "--target-size", "2.2MB")


def quantize(tiny, name: str, *args) -> Path:
    out = tiny["tmp"] / name
    r = run("-q", "quantize", tiny["bundle"], "-o", out, "--force", "--calibration", tiny["calib"],
            "--calibration-tokens", 4096, *args)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("options", [GPTQ, AUTO], ids=["gptq", "auto"])
def test_quantize_same_bytes_for_every_job_count(tiny, options):
    one = quantize(tiny, f"{options[1]}-j1", *options, "--jobs", 1)
    two = quantize(tiny, f"{options[1]}-j2", *options, "--jobs", 2)
    assert tree_hashes(one) == tree_hashes(two)
    assert len(tree_hashes(one)) > 16  # every expert shard is compared


def test_lower_same_bytes_for_every_job_count(lowered_tiny, tmp_path):
    """A fresh split lowered again, on 2 workers, writes every byte that lowered_tiny's run did (in
    process: 16 experts, and the default keeps small stages in-process): deterministic across runs
    and job counts."""
    two = tmp_path / "j2"
    assert run("-q", "split", "tiny", "-o", two).exit_code == 0
    r = run("-q", "lower", two, "--target", "all", "--jobs", 2)
    assert r.exit_code == 0, r.output
    hashes = tree_hashes(two)
    assert hashes == tree_hashes(lowered_tiny)
    assert sum(p.startswith(("executorch/", "onnx/")) for p in hashes) >= 2 * 16 + 2 * 4  # experts and backbone


def test_executor_options_are_checked(tiny, tmp_path):
    r = run("quantize", tiny["bundle"], "-o", tmp_path / "q", "--address", "head:6379")
    assert r.exit_code == 2 and "--address" in r.output and "--executor ray" in r.output
    r = run("lower", tiny["bundle"], "--jobs", 0)
    assert r.exit_code == 2 and "--jobs" in r.output
    with pytest.raises(CosmoeError, match="executor 'slurm' is not one of"):
        ExecutorConfig("slurm")
    with pytest.raises(CosmoeError, match="jobs must be a positive integer"):
        ExecutorConfig(jobs=0)


def test_results_come_in_task_order_whatever_finishes_first():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = executors._ordered(lambda args: pool.submit(_sleep_then_return, *args),
                                     lambda f: f.result(), lambda f: f.cancel(),
                                     [(i, 0.02 * (7 - i)) for i in range(8)], window=4)
        assert list(results) == list(range(8))


def _sleep_then_return(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


# ---- Ray -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]' (EXTRAS=test installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_writes_the_same_bytes_as_a_local_build(ray_cluster, tiny):
    local = quantize(tiny, "gptq-local", *GPTQ, "--jobs", 1)
    remote = quantize(tiny, "gptq-ray", *GPTQ, "--executor", "ray")
    assert tree_hashes(remote) == tree_hashes(local)


def test_ray_lowers_every_expert_as_locally(ray_cluster, lowered_tiny):
    # The expert tasks of `lower` as Ray tasks (the backbone's units are exported by the caller,
    # whatever the executor: test_lower_same_bytes_for_every_job_count covers the whole command).
    # ONNX only: the task mechanism is the same for both targets, and an ExecuTorch task costs each
    # Ray worker a template export first (about 30 s of this test on 2 cores).
    from cosmoe_export import lower
    from runtime_py.bundle import Bundle

    bundle = Bundle.open(lowered_tiny)
    manifest = hashlib.sha256((lowered_tiny / "manifest.json").read_bytes()).hexdigest()
    programs = {(f.target, f.layer, f.expert): f for f in bundle.files
                if f.role == "program" and f.unit == "expert" and f.target == "onnx"}
    tasks = [(lower._Job(str(lowered_tiny), manifest, target), layer, e) for target, layer, e in sorted(programs)]
    with executors.open_executor(ExecutorConfig("ray"), tasks=len(tasks)) as ex:
        assert ex.jobs == 2
        for (job, layer, e), (data, sha256, precision) in zip(tasks, ex.map(lower._expert_task, tasks), strict=True):
            f = programs[(job.target, layer, e)]
            assert (sha256, precision) == (f.sha256, f.precision) and (lowered_tiny / f.path).read_bytes() == data


def test_a_recipe_names_the_executor(tmp_path):
    from cosmoe_export.release.recipe import recipe_from_dict

    r = recipe_from_dict({"executor": {"name": "ray", "address": "head:6379", "jobs": 8}}, base=tmp_path)
    assert r.executor.config() == ExecutorConfig("ray", 8, "head:6379")
    assert recipe_from_dict({}, base=tmp_path).executor.config() == ExecutorConfig()
    for section, message in [({"name": "slurm"}, "executor.name: 'slurm' is not one of ['local', 'ray']"),
                             ({"jobs": 0}, "executor.jobs: must be >= 1"),
                             ({"address": "head:6379"}, 'executor.address: only applies with executor.name = "ray"')]:
        with pytest.raises(CosmoeError, match=re.escape(message)):
            recipe_from_dict({"executor": section}, base=tmp_path, where="r.toml")
