"""tools/train.py on the bundled digits: the loss falls, a killed run resumes exactly where it stopped, a finished
run says so, the best checkpoint survives a resume into a new --output, and bad input gets clear errors."""
import argparse
import contextlib
import importlib
import json
import os
import shutil
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
    # the eval sampler pads 359 images to 2 x 180; the padding is not counted
    assert ckpt["history"][-1]["n"] == 359


def test_amp_channels_last_compile_flags(data_env, tmp_path):
    """The runtime switches work together: bf16 autocast on CPU, channels-last, torch.compile (eager backend here)."""
    import train
    metrics = train.main(TINY + ["--epochs", "1", "--max-steps-per-epoch", "2", "--amp", "--channels-last",
                                 "--torchcompile", "eager", "--output", str(tmp_path / "amp")])
    assert metrics["n"] == 359 and 0.0 <= metrics["top1"] <= 100.0
    ckpt = torch.load(tmp_path / "amp" / "last.pth.tar", weights_only=True)
    assert ckpt["args"]["amp"] and ckpt["args"]["channels_last"] and ckpt["step"] == 2
    assert not any(k.startswith("_orig_mod") for k in ckpt["state_dict"])  # saved unwrapped


def _tool(name, args, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", name)] + args, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_run(data_env, tmp_path_factory):
    """A finished 2-epoch tiny run with EMA (4 steps an epoch)."""
    import train
    out = str(tmp_path_factory.mktemp("finished") / "run")
    train.main(TINY + ["--epochs", "2", "--max-steps-per-epoch", "4", "--model-ema", "--model-ema-decay", "0.9",
                       "--output", out])
    return out


def test_resume_of_a_finished_run_trains_nothing(data_env, finished_run, tmp_path):
    last = os.path.join(finished_run, "last.pth.tar")
    before = {f: os.path.getmtime(os.path.join(finished_run, f)) for f in os.listdir(finished_run)}
    new_out = str(tmp_path / "elsewhere")
    args = TINY + ["--epochs", "2", "--max-steps-per-epoch", "4", "--model-ema", "--resume", last, "--output", new_out]
    res = _tool("train.py", args, data_env)
    assert res.returncode == 0, res.stderr
    hist = torch.load(last, weights_only=True)["history"]
    best = max(hist, key=lambda r: r["top1"])
    assert "finished run: 2/2 epochs done" in res.stdout, res.stdout
    assert f"best {best['top1']:.2f}% at epoch {best['epoch']}" in res.stdout
    assert "on 359 held-out images" in res.stdout and "continuing" not in res.stdout + res.stderr
    assert f"checkpoints in {finished_run}: " in res.stdout
    named = res.stdout.split(f"checkpoints in {finished_run}: ")[1].split(". ")[0].split(", ")
    assert sorted(named) == sorted(f for f in os.listdir(finished_run) if f.endswith(".pth.tar"))
    assert not os.path.exists(new_out)  # nothing written
    assert before == {f: os.path.getmtime(os.path.join(finished_run, f)) for f in os.listdir(finished_run)}


def _fake_best_first_epoch(run_dir, top1=99.0):
    """Make epoch 1 the (recorded) best of ``run_dir``: its history row in last.pth.tar and checkpoint-0's metric."""
    last = os.path.join(run_dir, "last.pth.tar")
    ckpt = torch.load(last, weights_only=True)
    ckpt["history"][0]["top1"] = top1
    torch.save(ckpt, last)
    first = os.path.join(run_dir, "checkpoint-0.pth.tar")
    ckpt0 = torch.load(first, weights_only=True)
    ckpt0["metric"] = top1
    torch.save(ckpt0, first)
    return ckpt0


def test_resume_into_new_output_keeps_the_best(data_env, finished_run, tmp_path):
    import train
    src = str(tmp_path / "src")
    shutil.copytree(finished_run, src)
    ckpt0 = _fake_best_first_epoch(src)
    out = str(tmp_path / "continued")
    train.main(TINY + ["--epochs", "3", "--max-steps-per-epoch", "4", "--model-ema", "--model-ema-decay", "0.9",
                       "--resume", os.path.join(src, "last.pth.tar"), "--output", out])
    best = torch.load(os.path.join(out, "model_best.pth.tar"), weights_only=True)
    assert best["epoch"] == 0 and best["metric"] == 99.0  # the copy of the run's best, not the one epoch trained here
    for k in ckpt0["state_dict"]:
        torch.testing.assert_close(best["state_dict"][k], ckpt0["state_dict"][k], rtol=0, atol=0)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["best"] == dict(epoch=1, top1=99.0, copied_from=os.path.join(src, "checkpoint-0.pth.tar"))
    assert len(summary["history"]) == 3 and summary["history"][-1]["top1"] < 99.0

    # the best epoch's file is gone: nothing claims to be the best until an epoch beats it
    os.remove(os.path.join(src, "checkpoint-0.pth.tar"))
    out2 = str(tmp_path / "continued2")
    train.main(TINY + ["--epochs", "3", "--max-steps-per-epoch", "4", "--model-ema", "--model-ema-decay", "0.9",
                       "--resume", os.path.join(src, "last.pth.tar"), "--output", out2])
    assert not os.path.exists(os.path.join(out2, "model_best.pth.tar"))
    assert json.load(open(os.path.join(out2, "summary.json")))["best"]["copied_from"] is None


def test_missing_or_wrong_data_dir_is_an_argparse_error(data_env, tmp_path):
    res = _tool("train.py", TINY + ["--data-dir", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")],
                data_env)
    assert res.returncode == 2 and "usage:" in res.stderr, res.stderr
    assert "does not exist" in res.stderr and "train/" in res.stderr and "validation/" in res.stderr
    assert "Traceback" not in res.stderr

    import train
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--data-dir", str(tmp_path / "only_train")])
    assert e.value.code == 2
    (tmp_path / "only_train" / "val").mkdir()
    with pytest.raises(SystemExit):  # a split folder without class folders
        train.parse_args(TINY + ["--data-dir", str(tmp_path / "only_train")])
    (tmp_path / "only_train" / "val" / "a").mkdir()
    args = train.parse_args(TINY + ["--data-dir", str(tmp_path / "only_train")])
    assert args.val_split == "val"


def _help_entries(parser):
    """Map each option string to the help text --help prints for it."""
    entries, current = {}, None
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            current = [part.split()[0] for part in invocation.split(", ")]
            for opt in current:
                entries[opt] = text.strip()
        elif current and line.startswith("    ") and line.strip():
            for opt in current:
                entries[opt] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("tool", ["train", "validate"])
def test_help_explains_every_option_and_shows_its_default(tool, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    parser = importlib.import_module(tool).build_parser()
    entries = _help_entries(parser)
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) > 10
    for action in options:
        text = entries[action.option_strings[0]]
        assert action.help and "(default: " in text, (action.option_strings, text)


def test_model_kwargs_use_timm_parse_kwargs(capsys):
    import train
    import validate
    from timm.utils import ParseKwargs
    for parser in (train.build_parser(), validate.build_parser()):
        action = next(a for a in parser._actions if a.dest == "model_kwargs")
        assert isinstance(action, ParseKwargs)
    args = train.parse_args(["--recipe", "digits", "--model-kwargs", "dims=[8, 16, 24, 32]", "act_layer=gelu"])
    assert args.model_kwargs == {"dims": [8, 16, 24, 32], "act_layer": "gelu"}  # replaces the recipe's
    assert train.parse_args(["--recipe", "digits"]).model_kwargs["dims"] == [32, 64, 128, 192]
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model-kwargs", "{dims: [8]}"])
    assert e.value.code == 2 and "is not key=value" in capsys.readouterr().err


def test_validate_use_ema_evaluates_ema_or_says_there_is_none(data_env, finished_run, tmp_path, capsys):
    import validate
    last = os.path.join(finished_run, "last.pth.tar")
    ckpt = torch.load(last, weights_only=True)
    ema = validate.main(["--checkpoint", last, "--use-ema", "--workers", "0"])
    assert ema["weights"] == "state_dict_ema" and ema["images"] == 359
    assert ema["top1"] == pytest.approx(ckpt["history"][-1]["top1"], abs=1e-3)  # training evaluates the EMA
    assert validate.main(["--checkpoint", last, "--workers", "0"])["weights"] == "state_dict"

    del ckpt["state_dict_ema"]
    plain = str(tmp_path / "no_ema.pth.tar")
    torch.save(ckpt, plain)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        validate.main(["--checkpoint", plain, "--use-ema", "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and plain in err and "no EMA weights" in err and "Drop --use-ema" in err
    with pytest.raises(SystemExit):
        validate.main(["--checkpoint", last, "--data-dir", str(tmp_path), "--workers", "0"])
    assert "has no validation/ or val/" in capsys.readouterr().err


def test_evaluate_does_not_count_distributed_padding():
    """timm's distributed eval sampler pads the ranks to equal length; evaluate() counts each image once."""
    import train
    from timm.data.distributed_sampler import OrderedDistributedSampler
    ds = torch.utils.data.TensorDataset(torch.randn(7, 3, 2, 2), torch.arange(7) % 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    args = argparse.Namespace(channels_last=False, distributed=False)
    per_rank = []
    for rank in (0, 1):
        sampler = OrderedDistributedSampler(ds, num_replicas=2, rank=rank)
        assert len(sampler) == 4  # rank 1 gets image 0 again as padding
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler)
        per_rank.append(train.evaluate(model, loader, torch.device("cpu"), args, contextlib.nullcontext)["n"])
    assert per_rank == [4, 3]


def test_validate_rejects_a_checkpoint_of_another_architecture(data_env, finished_run, capsys):
    import validate
    with pytest.raises(SystemExit) as e:
        validate.main(["--checkpoint", os.path.join(finished_run, "last.pth.tar"), "--model-kwargs",
                       "dims=[16, 24, 32, 64]", "--workers", "0"])  # over the checkpoint's model_kwargs
    assert "mis-shaped" in str(e.value) and "Nothing was loaded" in str(e.value)
