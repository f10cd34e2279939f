"""The wheel installs only metaformer_zoo (with kernels/ mapped to metaformer_zoo.kernels) and the CLI works."""
import glob
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    names = zipfile.ZipFile(glob.glob(str(tmp_path / "*.whl"))[0]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"metaformer_zoo", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "metaformer_zoo/kernels/__init__.py" in names
    kernel_ops = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(REPO, "kernels", "*", "__init__.py"))}
    for op in kernel_ops:
        assert f"metaformer_zoo/kernels/{op}/__init__.py" in names


def test_kernels_import_from_checkout():
    import metaformer_zoo.kernels as k
    assert os.path.dirname(k.__file__) in (os.path.join(REPO, "kernels"), os.path.join(REPO, "metaformer_zoo", "kernels"))


def test_list_cli():
    out = subprocess.run([sys.executable, "-m", "metaformer_zoo", "list", "--family", "randformer", "--format", "csv"],
                         check=True, capture_output=True, text=True, cwd=REPO).stdout.splitlines()
    assert out[0].startswith("name,family,owner,params")
    row = dict(zip(out[0].split(","), out[1].split(",")))
    assert row["name"] == "randformer_s12" and int(row["params"]) == 12_127_010
    assert int(row["trainable_params"]) == 11_891_712 and int(row["macs"]) == 1_888_484_352
