"""`export-hub`: the kernels-hub build, loaded with the real `kernels` library (get_local_kernel, LOCAL_KERNELS),
gives the package's outputs, runs where flash-attn-metal is not installed, and serves transformers'
`attn_implementation="<org>/<repo>"` and diffusers' `flash_hub` backend."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import cli, flash_attn_interface, ops
from flash_attn_metal.integrations import hub

kernels = pytest.importorskip("kernels")
from kernels._rust import Digest, DigestAlgorithm, Metadata  # noqa: E402

REPO = "flash-attn-metal/flash-attn-metal"  # any <org>/<repo>: LOCAL_KERNELS maps it to the export


pytestmark = pytest.mark.usefixtures("emulator_strict")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("kernel-repo")
    assert cli.main(["export-hub", str(directory)]) == 0
    return hub.variant_dir(directory)


@pytest.fixture(scope="module")
def kernel(build):
    return kernels.get_local_kernel(build)


def test_the_build_has_the_hub_layout_and_a_valid_digest(build, tmp_path):
    metadata = json.loads((build / "metadata.json").read_text())
    assert build.name == "torch-metal" and build.parent.name == "build"
    assert metadata["name"] == "flash-attn-metal" and metadata["backend"] == {"type": "metal"}
    assert metadata["id"].isidentifier() and metadata["python-depends"] == []
    assert (build / "__init__.py").is_file() and (build / "flash_attn_metal" / "__init__.py").is_file()
    assert not (build / "flash_attn_metal" / "integrations").exists() and not (build / "flash_attn_metal" / "cli.py").exists()
    Metadata.read_from_file(build / "metadata.json").digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, build))
    tampered = tmp_path / "torch-metal"
    shutil.copytree(build, tampered)
    (tampered / "flash_attn_metal" / "interface.py").write_text("# changed\n")
    with pytest.raises(Exception, match="interface.py"):
        Metadata.read_from_file(tampered / "metadata.json").digest.validate(
            Digest.hash_variant(DigestAlgorithm.SHA256, tampered))


def test_export_replaces_an_earlier_export_but_nothing_else(tmp_path):
    first = hub.export(tmp_path)
    assert hub.export(tmp_path) == first and (first / "metadata.json").is_file()
    other = tmp_path / "elsewhere"
    (hub.variant_dir(other)).mkdir(parents=True)
    (hub.variant_dir(other) / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a flash-attn-metal hub build"):
        hub.export(other)
    assert (hub.variant_dir(other) / "notes.txt").read_text() == "mine"


def test_get_local_kernel_gives_the_package_outputs(kernel):
    assert kernel.flash_attn_func is not flash_attn_metal.flash_attn_func  # the build's own copy
    assert {"flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "flash_attn_interface"} <= set(
        kernel.__all__)
    assert callable(kernel.flash_attn_interface._flash_attn_forward)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 32, requires_grad=True) for _ in range(3))
    outputs = []
    for module in (kernel, flash_attn_metal):
        out = module.flash_attn_func(q, k, v, causal=True)
        outputs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    # Its torch ops are its own: registering the package's names again would replace the package's ops.
    namespace = sys.modules[kernel.__name__ + ".flash_attn_metal.ops"].NAMESPACE
    assert namespace != ops.NAMESPACE and getattr(torch.ops, namespace).forward is not None
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    flat = [t.detach()[0] for t in (q, k, v)]
    assert torch.equal(kernel.flash_attn_varlen_func(*flat, cu, cu, 7, 7, causal=True),
                       flash_attn_metal.flash_attn_varlen_func(*flat, cu, cu, 7, 7, causal=True))
    caches = [torch.zeros(2, 16, 2, 32) for _ in range(4)]
    new = [t.detach()[:, :3] for t in (q, k, v)]
    lens = torch.tensor([4, 9], dtype=torch.int32)
    ours = kernel.flash_attn_with_kvcache(new[0], caches[0], caches[1], new[1], new[2], cache_seqlens=lens)
    package = flash_attn_metal.flash_attn_with_kvcache(new[0], caches[2], caches[3], new[1], new[2], cache_seqlens=lens)
    assert torch.equal(ours, package) and torch.equal(caches[0], caches[2])
    assert not flash_attn_metal.stats()["fallbacks"]


def test_the_functions_transformers_calls_declare_s_aux(kernel):
    """transformers passes a hub kernel the sinks (s_aux) only where its functions declare them."""
    for name in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"):
        parameters = inspect.signature(getattr(kernel, name)).parameters
        assert "s_aux" in parameters and "window_size" in parameters and "softcap" in parameters
    q = torch.randn(1, 4, 2, 32)
    assert torch.equal(kernel.flash_attn_func(q, q, q, s_aux=None), flash_attn_metal.flash_attn_func(q, q, q))
    sinks = torch.tensor([0.5, -1.0])
    with_sinks = kernel.flash_attn_func(q, q, q, s_aux=sinks)
    assert torch.equal(with_sinks, flash_attn_metal.flash_attn_func(q, q, q, sinks=sinks))
    assert not torch.equal(with_sinks, flash_attn_metal.flash_attn_func(q, q, q))  # the sinks were not dropped


def test_the_build_runs_where_flash_attn_metal_is_not_installed(build):
    """A fresh interpreter without site processing: torch and kernels from site-packages, no flash_attn_metal."""
    code = (
        f"import sys; sys.path += {site.getsitepackages()!r}\n"
        "try:\n"
        "    import flash_attn_metal\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('flash_attn_metal is importable here')\n"
        "import torch\n"
        "from pathlib import Path\n"
        "from kernels import get_local_kernel\n"
        f"kernel = get_local_kernel(Path({str(build)!r}))\n"
        "q = torch.randn(1, 16, 2, 32)\n"  # more than 8 query rows: the block forward
        "out = kernel.flash_attn_func(q, q, q, causal=True)\n"
        "package = sys.modules[kernel.__name__ + '.flash_attn_metal']\n"
        "print(sorted(package.stats()['launches']), out.shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "attention_forward" in result.stdout and "torch.Size([1, 16, 2, 32])" in result.stdout


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_transformers_loads_the_build_through_local_kernels(build, monkeypatch):
    from transformers.integrations import hub_kernels

    # transformers 5.24 pins kernels >= 0.18.2, which this registry does not have; 0.17.2 serves the same calls.
    monkeypatch.setattr(hub_kernels, "is_kernels_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(hub_kernels, "get_kernel_hub", kernels.get_kernel, raising=False)
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO}={build}")
    model = tiny_llama()
    ids = torch.randint(3, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(REPO)
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert (ours - eager)[mask.bool()].abs().max().item() <= 1e-4
    loaded = [m for name, m in sys.modules.items() if name.endswith(".flash_attn_metal") and m is not flash_attn_metal]
    assert any(m.stats()["launches"] for m in loaded)  # the build's kernels ran
    assert not flash_attn_metal.stats()["launches"]  # not the installed package's


def test_diffusers_flash_hub_backend_loads_the_build(build, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend, dispatch_attention_fn

    config = attention_dispatch._HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_HUB]
    for field in ("kernel_fn", "wrapped_forward_fn", "wrapped_backward_fn"):
        monkeypatch.setattr(config, field, None)  # loaded afresh, forgotten after
    monkeypatch.setattr(attention_dispatch, "HF_HUB_OFFLINE", True)  # no publisher look-up on the network
    monkeypatch.setenv("LOCAL_KERNELS", f"{config.repo_id}={build}")
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 2, 32), torch.randn(2, 20, 2, 32), torch.randn(2, 20, 2, 32)
    with attention_backend("native"):
        native = dispatch_attention_fn(q, k, v)
    with attention_backend("flash_hub"):
        ours = dispatch_attention_fn(q, k, v)
    assert (ours - native).abs().max().item() <= 1e-5
    assert config.wrapped_forward_fn.__module__.endswith("flash_attn_metal.flash_attn_interface")
    assert config.wrapped_forward_fn is not flash_attn_interface._flash_attn_forward
