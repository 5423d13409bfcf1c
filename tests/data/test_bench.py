"""`pinnsketch bench`: policies side by side, table and JSON records, clear errors."""

import argparse
import json

import pytest

from pinnsketch.cli import main
from pinnsketch.data import DataDirectoryError
from pinnsketch.data.bench import add_bench_parser, format_table, parse_storage, run_bench
from pinnsketch.nn import EMAStorage, LowRankStorage

REQUIRED = {"dataset", "model", "storage", "test_accuracy", "saved_bytes_peak", "ratio_to_exact",
            "epoch_time_ratio_to_exact", "ranks", "epochs", "seed", "torch", "device"}


def parser():
    p = argparse.ArgumentParser(prog="pinnsketch")
    add_bench_parser(p.add_subparsers(dest="command"))
    return p


def test_run_bench_records(capsys):
    records = run_bench("digits", ["projection", "lowrank:rank=2,adaptive=false"], epochs=1, width=16, depth=1,
                        batch_size=128)
    assert [r["storage"] for r in records] == ["exact", "projection", "lowrank:rank=2,adaptive=false"]
    assert [r["policy"] for r in records] == ["exact", "projection", "lowrank"]
    for r in records:
        assert REQUIRED <= set(r)
        assert r["dataset"] == "digits" and r["model"] == "mlp 64-16x1-10 relu" and r["epochs"] == 1
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["saved_bytes_peak"] > 0
    exact, projection, lowrank = records
    assert exact["ratio_to_exact"] == 1.0 and exact["epoch_time_ratio_to_exact"] == 1.0 and exact["ranks"] == [None, None]
    assert projection["ratio_to_exact"] == projection["saved_bytes_peak"] / exact["saved_bytes_peak"] < 1
    assert lowrank["ranks"] == [2, 2]
    table = format_table(records)
    assert table.count("\n") == 4 and "lowrank:rank=2,adaptive=false" in table and "| 2,2" in table


def test_cli_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    status = main(["bench", "digits", "--storage", "checkpoint", "--epochs", "1", "--width", "8",
                   "--depth", "1", "--seed", "3", "--json", str(out), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| digits" in printed and "checkpoint" in printed
    payload = json.loads(out.read_text())
    assert payload["command"] == ("pinnsketch bench digits --storage checkpoint --epochs 1 --width 8 --depth 1 "
                                  "--device cpu --seed 3")
    assert [r["storage"] for r in payload["records"]] == ["exact", "checkpoint"]
    assert all(r["seed"] == 3 and REQUIRED <= set(r) for r in payload["records"])
    # Both compute exact gradients from the same init and batches: same accuracy.
    assert payload["records"][0]["test_accuracy"] == payload["records"][1]["test_accuracy"]


def test_bench_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataDirectoryError, match="no MNIST files in .*expected train-images-idx3-ubyte"):
        run_bench("mnist", ["exact"], data_dir=tmp_path, epochs=1)
    with pytest.raises(ValueError, match="unknown storage policy 'svd'"):
        run_bench("digits", ["svd"], epochs=1)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        run_bench("imagenet")
    with pytest.raises(SystemExit):
        parser().parse_args(["bench", "imagenet"])


def test_cli_reports_a_bad_data_directory_on_one_line(tmp_path, capsys):
    assert main(["bench", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"pinnsketch: error: no CIFAR-10 files in {tmp_path}: expected data_batch_1")


def test_parse_storage():
    assert parse_storage("lowrank") == "lowrank"
    policy = parse_storage("lowrank:rank=8,adaptive=false,residual=int4,target=0.05")
    assert isinstance(policy, LowRankStorage)
    assert (policy.fixed_rank, policy.adaptive, policy.bits, policy.target) == (8, False, 4, 0.05)
    ema = parse_storage("ema:beta=0.99,rank=none")
    assert isinstance(ema, EMAStorage) and ema.beta == 0.99 and ema.fixed_rank is None
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_storage("lowrank:8")
    with pytest.raises(ValueError, match="bad options for storage 'ema'"):
        parse_storage("ema:gamma=1")
    with pytest.raises(ValueError, match="unknown storage policy 'foo' in 'foo:x=1'"):
        parse_storage("foo:x=1")


def test_bench_cifar10_cnn_from_files_in_the_real_format(tmp_path):
    from data_formats import write_cifar

    write_cifar(tmp_path / "cifar-10-batches-py", n=16)
    records = run_bench("cifar10", ["lowrank"], data_dir=tmp_path, epochs=1, batch_size=16)
    assert [r["storage"] for r in records] == ["exact", "lowrank"]
    assert records[0]["model"] == "cnn 3x32x32->10" and records[0]["n_train"] == 80 and records[0]["n_test"] == 16
    assert len(records[1]["ranks"]) == 2  # the CNN's dense head is what the policy stores
