"""tools/train.py on the bundled digits: the loss falls, and a killed run resumes exactly where it stopped."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

TINY = ["--model", "zoo_metaformer", "--model-kwargs", "dims=[16, 24, 32, 48]", "depths=[1, 1, 1, 1]",
        "token_mixers=['pooling', 'sepconv', 'attention', 'attention']",
        "--digits-size", "32", "--img-size", "32", "--crop-pct", "1.0", "-b", "32", "--lr", "3e-3",
        "--warmup-epochs", "0", "--hflip", "0", "--color-jitter", "0", "--scale", "0.8", "1.0", "--workers", "0",
        "--no-progress", "--max-steps-per-epoch", "12", "--seed", "3"]


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    os.environ["METAFORMER_ZOO_DATA"] = root
    from metaformer_zoo.data import prepare_digits
    path = prepare_digits(root, size=32)
    yield dict(os.environ, METAFORMER_ZOO_DATA=root, PYTHONPATH=REPO)
    os.environ.pop("METAFORMER_ZOO_DATA", None)


def test_digits_dataset_is_an_imagefolder(data_env):
    from metaformer_zoo.data import prepare_digits
    root = prepare_digits(data_env["METAFORMER_ZOO_DATA"], size=32)
    from timm.data import create_dataset
    ds = create_dataset("", root=root, split="train")
    val = create_dataset("", root=root, split="validation")
    assert len(ds) + len(val) == 1797 and len(val) == 359
    img, label = ds[0]
    assert img.size == (32, 32) and 0 <= label < 10


def test_short_run_loss_falls(data_env, tmp_path):
    import train
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "3", "--output", out])
    import json
    hist = json.load(open(os.path.join(out, "summary.json")))["history"]
    assert len(hist) == 3 and hist[-1]["step"] == 36
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.2, hist
    assert hist[-1]["train_loss"] < hist[0]["train_loss"], hist
    assert hist[-1]["top1"] > 30.0  # chance is 10%
    ckpt = torch.load(os.path.join(out, "last.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 36 and ckpt["arch"] == "zoo_metaformer"


def test_kill_and_resume_continues_exactly(data_env, tmp_path):
    import train
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    args = TINY + ["--epochs", "3", "--model-ema", "--model-ema-decay", "0.9"]
    train.main(args + ["--output", ref_dir])
    ref = torch.load(os.path.join(ref_dir, "last.pth.tar"), weights_only=True)

    # the same run in a subprocess, killed (SIGKILL) as soon as its first checkpoint exists
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "train.py")] + args + ["--output", run_dir],
                            env=data_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(run_dir, "last.pth.tar")
    deadline = time.time() + 600
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)
    assert killed_at["epoch"] < 2, "the run finished before it could be killed"

    train.main(args + ["--output", run_dir, "--resume", last])
    res = torch.load(last, weights_only=True)
    assert res["step"] == ref["step"] == 36 and res["epoch"] == ref["epoch"] == 2
    for k in ref["state_dict"]:
        torch.testing.assert_close(res["state_dict"][k], ref["state_dict"][k], rtol=0, atol=0, msg=k)
    for k in ref["state_dict_ema"]:
        torch.testing.assert_close(res["state_dict_ema"][k], ref["state_dict_ema"][k], rtol=0, atol=0, msg=k)
    ref_opt, res_opt = ref["optimizer"]["state"], res["optimizer"]["state"]
    assert ref_opt.keys() == res_opt.keys()
    for i in ref_opt:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(res_opt[i][name], ref_opt[i][name], rtol=0, atol=0)
    assert [r["top1"] for r in res["history"]] == [r["top1"] for r in ref["history"]]


def test_recipes_parse_and_reject_unknown_keys(tmp_path):
    import train
    args = train.parse_args(["--recipe", "digits"])
    assert args.model == "zoo_metaformer" and args.hflip == 0.0 and args.img_size == 64
    args = train.parse_args(["--recipe", "digits", "--epochs", "1"])
    assert args.epochs == 1  # command line beats the recipe
    for name in sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "train")) if f.endswith(".yaml")):
        a = train.parse_args(["--recipe", name])
        assert a.epochs > 0 and a.model, name
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 1.0\n")
    with pytest.raises(SystemExit, match="unknown keys"):
        train.parse_args(["--recipe", str(bad)])
    with pytest.raises(SystemExit, match="unknown recipe"):
        train.parse_args(["--recipe", "nosuchrecipe"])


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(data_env, tmp_path):
    """Two Gloo processes on CPU through torchrun: both ranks train, rank 0 saves."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(REPO, "tools", "train.py")] + TINY + ["--epochs", "1", "--output", out]
    subprocess.run(cmd, env=data_env, check=True, timeout=900)
    ckpt = torch.load(os.path.join(out, "last.pth.tar"), weights_only=True)
    assert ckpt["args"]["world_size"] == 2 and ckpt["step"] == 12


def test_amp_channels_last_compile_flags(data_env, tmp_path):
    """The runtime switches work together: bf16 autocast on CPU, channels-last, torch.compile (eager backend here)."""
    import train
    metrics = train.main(TINY + ["--epochs", "1", "--max-steps-per-epoch", "2", "--amp", "--channels-last",
                                 "--torchcompile", "eager", "--output", str(tmp_path / "amp")])
    assert metrics["n"] == 359 and 0.0 <= metrics["top1"] <= 100.0
    ckpt = torch.load(tmp_path / "amp" / "last.pth.tar", weights_only=True)
    assert ckpt["args"]["amp"] and ckpt["args"]["channels_last"] and ckpt["step"] == 2
    assert not any(k.startswith("_orig_mod") for k in ckpt["state_dict"])  # saved unwrapped
