"""Command-line pieces every tool shares (``tools/*.py``)."""
import argparse

__all__ = ["model_kwarg"]


def model_kwarg(item: str) -> str:
    """argparse ``type`` of one ``--model-kwargs`` (``--teacher-kwargs``, ``--mixer-kwargs``) item: insists on
    ``key=value``; timm's ``ParseKwargs`` action then parses the values as Python literals."""
    key, eq, _ = item.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(
            f"{item!r} is not key=value; give create_model kwargs as key=value items with Python literals, e.g. "
            f"--model-kwargs \"dims=[32, 64, 128, 192]\" \"token_mixers=['pooling', 'sepconv', 'attention', "
            f"'attention']\" drop_path_rate=0.1")
    return item
