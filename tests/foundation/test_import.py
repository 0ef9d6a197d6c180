"""Importing fasttune changes nothing in other libraries."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_patches_nothing():
    script = textwrap.dedent(
        """
        import inspect, torch, transformers, peft, trl, bitsandbytes
        from transformers.models.llama import modeling_llama as ml
        from transformers.models.gemma2 import modeling_gemma2 as mg
        from peft.tuners.lora import layer as ll, bnb as lb

        def snapshot():
            out = {}
            for mod in (ml, mg, ll, lb, torch.nn.functional, transformers.modeling_utils, trl.trainer.sft_trainer):
                for name, obj in vars(mod).items():
                    out[(mod.__name__, name)] = id(obj)
                    if inspect.isclass(obj):
                        for attr, val in vars(obj).items():
                            out[(mod.__name__, name, attr)] = id(val)
            for cls in (torch.nn.Linear, torch.nn.Module, bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt):
                for attr, val in vars(cls).items():
                    out[(cls.__name__, attr)] = id(val)
            return out

        before = snapshot()
        import fasttune, fasttune.chat_templates, fasttune.trainer  # noqa
        after = snapshot()
        changed = sorted(str(k) for k in before if before[k] != after.get(k))
        print("CHANGED", changed[:20])
        assert not changed, changed
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "CHANGED []" in result.stdout


def test_only_the_bitsandbytes_kernel_probe_line_is_dropped_and_only_meanwhile(caplog):
    """bitsandbytes >= 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community" when imported on an
    AVX512-BF16 CPU without the kernels hub; fasttune's own 4-bit forward replaces that kernel, so the line is dropped
    while fasttune imports its dependencies. Other warnings pass, and the logger is left as it was."""
    import logging

    from fasttune.notes import KERNEL_PROBE, quiet_kernel_probe

    probe = logging.getLogger(KERNEL_PROBE[0])
    filters = list(probe.filters)
    with caplog.at_level(logging.WARNING, logger=KERNEL_PROBE[0]):
        with quiet_kernel_probe():
            probe.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
            probe.warning("another bitsandbytes warning")
        probe.warning("Failed to load CPU gemm_4bit_forward from kernels-community: later")
    assert [r.getMessage() for r in caplog.records] == [
        "another bitsandbytes warning", "Failed to load CPU gemm_4bit_forward from kernels-community: later"]
    assert probe.filters == filters
