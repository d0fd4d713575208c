"""One CLI convention (issue 17): --json/--device/--quiet on every command that computes, one spelling per
concept (old spellings hidden, working, with a deprecation note), defaults in every --help, and a
subcommand's own usage on a subcommand error (exit 2)."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from lmckit.cli import COMPUTING, build_parser, main

PNG = b"\x89PNG\r\n\x1a\n"


def _subparsers(parser, prefix=()):
    """Every (command words, parser) of the CLI, nested ones (data list/info/download) included."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield (*prefix, name), sp
                yield from _subparsers(sp, (*prefix, name))


SUBCOMMANDS = list(_subparsers(build_parser()))
NAMES = [" ".join(words) for words, _ in SUBCOMMANDS]

#: the smallest valid argument list of each computing command (parsed only, nothing runs)
MINIMAL = {
    "train": [],
    "match": ["a", "b", "--out", "p.json"],
    "barrier": ["a", "b"],
    "analyze": ["a", "b"],
    "merge": ["a", "b", "--out", "m"],
    "landscape": ["a", "b", "c", "--plot", "p.png"],
    "check-spec": ["mlp_tiny"],
    "reproduce": [],
}


def test_every_command_is_in_the_table():
    top = {words[0] for words, _ in SUBCOMMANDS}
    assert set(COMPUTING) <= top and set(MINIMAL) == set(COMPUTING)
    assert {"models", "methods", "data"} <= top and "data download" in NAMES


@pytest.mark.parametrize("words,parser", SUBCOMMANDS, ids=NAMES)
def test_help_exits_0_and_states_every_default(words, parser, capsys):
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lmckit {' '.join(words)}")
    fmt = parser._get_formatter()
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(
            a, (argparse._HelpAction, argparse._SubParsersAction, argparse._StoreTrueAction)
        ):
            continue
        if not a.option_strings and a.nargs not in ("?", "*"):
            continue  # a required positional has no default
        text = fmt._expand_help(a) if a.help else ""
        assert "default" in text.lower() or "(required)" in text, (
            f"lmckit {' '.join(words)} {'/'.join(a.option_strings) or a.dest}: --help states no default: {text!r}"
        )
    assert "%(" not in out, "an unexpanded %-format in --help"
    # the bounds text added by the reliability work survives beside the default
    if words == ("barrier",):
        assert "(default 25, at most 1001)" in " ".join(out.split())
    if words == ("reproduce",):
        assert "(default: runs/)" in out and "at most 256" in " ".join(out.split())


@pytest.mark.parametrize("cmd", COMPUTING)
def test_computing_commands_take_json_device_quiet(cmd):
    ns = build_parser().parse_args([cmd, *MINIMAL[cmd], "--json", "--device", "cpu", "--quiet"])
    assert ns.json is True and ns.device == "cpu" and ns.quiet is True
    ns = build_parser().parse_args([cmd, *MINIMAL[cmd]])
    assert ns.json is False and ns.device == "auto" and ns.quiet is False


@pytest.mark.parametrize(
    "argv",
    [
        ["models"],
        ["methods"],
        ["data", "list"],
        ["data", "info", "synthetic"],
        ["data", "download", "mnist", "--dry-run"],
    ],
)
def test_listing_commands_take_json(argv, capsys):
    assert build_parser().parse_args([*argv, "--json"]).json is True


def test_data_download_dry_run_json(capsys):
    assert main(["data", "download", "mnist", "--dry-run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "mnist" and d["dry_run"] is True and d["files"]


@pytest.mark.parametrize(
    "argv,usage",
    [
        (["models", "--device", "cpu"], "usage: lmckit models"),
        (["methods", "--quiet"], "usage: lmckit methods"),
        (["data", "download", "mnist", "--device", "cpu"], "usage: lmckit data download"),
        (["data", "list", "--no-such-option"], "usage: lmckit data list"),
        (["barrier", "a", "b", "--no-such-option"], "usage: lmckit barrier"),
        (["barrier", "a", "b", "--points", "0"], "usage: lmckit barrier"),
        (["landscape", "a", "b"], "usage: lmckit landscape"),
        (["match", "a", "b", "--out", "p.json", "c", "--bogus"], "usage: lmckit match"),
    ],
)
def test_subcommand_errors_show_the_subcommand_usage(argv, usage, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the one error convention first (`lmckit CMD: error: ...`), then the subcommand's usage, never the top level's
    assert err.startswith(f"lmckit {usage.split('lmckit ')[1]}: error:"), err
    assert f"\n{usage} [-h]" in err and "usage: lmckit [-h]" not in err, err
    if "--device" in argv or "--quiet" in argv:
        assert "computes nothing" in err and "train" in err  # says where the option does apply


# --------------------------------------------------------------------------- deprecated spellings
@pytest.mark.parametrize(
    "argv,dest,value,note",
    [
        (
            ["landscape", "a", "b", "c", "--plot", "p.png", "--perms", "pb.json", "pc.json"],
            "perm",
            ["pb.json", "pc.json"],
            "--perms is deprecated",
        ),
        (["analyze", "a", "b", "--plots", "figs"], "plot", "figs", "--plots is deprecated"),
        (["analyze", "a", "b", "--eval-limit", "7"], "limit", 7, "--eval-limit is deprecated"),
        (["barrier", "a", "b", "--eval-limit", "7"], "limit", 7, "--eval-limit is deprecated"),
        (["merge", "a", "b", "--out", "m", "--eval-limit", "7"], "limit", 7, "--eval-limit is deprecated"),
        (
            ["landscape", "a", "b", "c", "--plot", "p.png", "--eval-limit", "7"],
            "limit",
            7,
            "--eval-limit is deprecated",
        ),
    ],
)
def test_deprecated_spellings_work_and_warn(argv, dest, value, note, capsys):
    ns = build_parser().parse_args(argv)
    assert getattr(ns, dest) == value
    err = capsys.readouterr().err
    assert note in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "words,old",
    [
        (("landscape",), "--perms"),
        (("analyze",), "--plots"),
        (("analyze",), "--eval-limit"),
        (("barrier",), "--eval-limit"),
    ],
)
def test_deprecated_spellings_are_hidden(words, old, capsys):
    assert main([*words, "--help"]) == 0
    assert old not in capsys.readouterr().out


def test_new_spellings_parse():
    ns = build_parser().parse_args(["landscape", "a", "b", "c", "--plot", "p.png", "--perm", "x", "--perm", "y"])
    assert ns.perm == ["x", "y"]
    ns = build_parser().parse_args(["analyze", "a", "b", "--plot", "figs", "--limit", "5"])
    assert ns.plot == "figs" and ns.limit == 5


# --------------------------------------------------------------------------- on real (tiny) checkpoints
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three tiny MLPs (synthetic data, 1 epoch); run folders."""
    from lmckit.train import make_config, train

    root = tmp_path_factory.mktemp("runs")
    return [
        str(
            train(
                make_config(model="mlp_tiny", dataset="synthetic", epochs=1, batch_size=100, seed=s),
                out_root=root,
                device="cpu",
                progress=False,
            ).run_dir
        )
        for s in range(3)
    ]


def test_landscape_one_perm_is_refused_and_perms_alias_runs(ckpts, tmp_path, capsys):
    mdir = tmp_path / "m"
    assert main(["merge", *ckpts, "--out", str(mdir), "--points", "2", "--no-curve", "--json", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "landscape",
                *ckpts,
                "--perm",
                str(mdir / "perm_1.json"),
                "--grid",
                "2",
                "--limit",
                "20",
                "--plot",
                str(tmp_path / "one.png"),
            ]
        )
        == 2
    )
    assert "--perm PB --perm PC" in capsys.readouterr().err
    old = tmp_path / "old.png"
    assert (
        main(
            [
                "landscape",
                *ckpts,
                "--perms",
                str(mdir / "perm_1.json"),
                str(mdir / "perm_2.json"),
                "--grid",
                "2",
                "--limit",
                "20",
                "--plot",
                str(old),
                "--json",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert "--perms is deprecated" in cap.err and old.read_bytes()[:8] == PNG
    assert json.loads(cap.out)["perm_files"] == [str((mdir / f"perm_{i}.json").resolve()) for i in (1, 2)]


def test_quiet_silences_progress_and_restores_the_environment(ckpts, capsys, monkeypatch):
    import os

    monkeypatch.delenv("LMCKIT_NO_PROGRESS", raising=False)
    argv = ["barrier", ckpts[0], ckpts[1], "--points", "3", "--limit", "20", "--device", "cpu"]
    assert main(argv) == 0
    assert "[barrier" in capsys.readouterr().err  # progress lines without --quiet
    assert main([*argv, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "[barrier" not in cap.err and "acc_barrier" in cap.out  # the result still prints
    assert "LMCKIT_NO_PROGRESS" not in os.environ


def test_match_prints_what_each_method_iterates(ckpts, tmp_path, capsys):
    assert main(["match", ckpts[0], ckpts[1], "--out", str(tmp_path / "wm.json")]) == 0
    out = capsys.readouterr().out
    assert "sweeps:" in out and ("(converged)" in out or "not converged" in out)
    assert (
        main(
            [
                "match",
                ckpts[0],
                ckpts[1],
                "--method",
                "activation",
                "--num-batches",
                "2",
                "--batch-size",
                "50",
                "--out",
                str(tmp_path / "am.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sweeps" not in out and "one linear assignment per group on 2 batches of 50" in out


def test_merge_writes_png_only_when_asked(ckpts, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", *ckpts[:2], "--out", str(out), "--points", "2", "--limit", "50", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "merged_accuracy_plot" not in d and not list(tmp_path.rglob("*.png"))
    assert (
        main(["merge", *ckpts[:2], "--out", str(out), "--points", "2", "--no-curve", "--plot", str(tmp_path / "c.png")])
        == 2
    )
    assert "--no-curve" in capsys.readouterr().err


def test_merge_bn_reset_repair_matches_the_mean_endpoint_statistics(ckpts, tmp_path, capsys, synthetic):
    """REPAIR of the merged model (Jordan et al. 2023): every corrected unit's activation mean and std on the
    REPAIR batches equal the averages of the (aligned) models' own."""
    from lmckit.checkpoint import load_checkpoint
    from lmckit.lmc import Repairer, training_batches
    from lmckit.lmc.bn import site_stats
    from lmckit.merge import average_states, merged_state
    from lmckit.perm import apply_permutation, load_perms, spec_for

    out = tmp_path / "rep"
    assert (
        main(["merge", *ckpts, "--out", str(out), "--points", "2", "--no-curve", "--bn-reset", "repair", "--json"]) == 0
    )
    d = json.loads(capsys.readouterr().out)
    import lmckit

    merged = lmckit.load(out / "merged.safetensors")
    spec = spec_for(merged)
    states = [
        apply_permutation(spec, load_perms(out / f"perm_{i}.json", spec), load_checkpoint(p)[0])
        for i, p in enumerate(ckpts)
    ]
    plain = average_states(states)
    assert any(not torch.allclose(plain[k], v) for k, v in merged.state_dict().items())  # REPAIR changed it
    batches = training_batches(synthetic, 10, 500, 0, "cpu")
    rep = Repairer(copy.deepcopy(merged), [{k: v.clone() for k, v in s.items()} for s in states], batches)
    target = rep.target([1 / 3] * 3)
    # the sites of the CLI's merged checkpoint itself (the Repairer worked on a copy)
    sites = [(n, dict(merged.named_modules())[n]) for n, _ in rep.sites]
    got = site_stats(merged, batches, sites)
    again = merged_state(merged, states, synthetic, "repair")  # the library call gives the same weights
    assert all(torch.allclose(again[k], v, atol=1e-6) for k, v in merged.state_dict().items())
    for name, _ in rep.sites:
        assert torch.allclose(got[name][0], target[name][0], atol=1e-4)
        assert torch.allclose(got[name][1], target[name][1], atol=1e-3, rtol=1e-3)
    assert d["merged_accuracy"] == pytest.approx(
        lmckit.evaluate.evaluate(lmckit.load(out / "merged.safetensors"), synthetic, "test")[1], abs=1e-9
    )


def test_merge_repair_says_clearly_when_a_model_cannot_take_it(synthetic):
    """A hidden layer without a bias has no place for REPAIR's mean shift: an LmcError naming it, not a silent skip."""
    import torch.nn as nn

    from lmckit.errors import LmcError
    from lmckit.merge import merged_state
    from lmckit.models import create_model

    m = create_model("mlp_tiny")
    m.fc0 = nn.Linear(784, 16, bias=False)
    states = [{k: v + 0.01 * i for k, v in m.state_dict().items()} for i in range(2)]
    with pytest.raises(LmcError, match=r"REPAIR is not supported for MLP: hidden layers \['fc0'\] have no bias"):
        merged_state(m, states, synthetic, "repair")
    assert merged_state(m, states, synthetic, "off")["fc1.bias"].shape == (16,)  # the other modes still merge it
