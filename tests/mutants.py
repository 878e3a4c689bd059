"""Mutation testing: break each claim a pass makes, one at a time, and check the tests notice.

    make mutants                         # every mutant, two at a time
    .venv/bin/python tests/mutants.py -k ddl -j 1
    .venv/bin/python tests/mutants.py --list

A mutant is (name, claim, file, an exact source snippet, its replacement, the tests that must
catch it). For each mutant the repository's files (tracked, and untracked ones git does not
ignore: the working tree as it is) are copied to a temporary directory, the one replacement
is applied there (a snippet that is not found exactly once is an error: the mutant is stale),
and the named tests run against that copy with this venv's Python. The copy's `archfx`
package is the one imported (an `archfx/` directory of links to its `ir/` and `passes/`, first
on sys.path and PYTHONPATH; the run asserts it). Nothing in the repository itself is touched.

Before the mutants, the named tests run once on an unmutated copy and must pass (otherwise a
failing test would "catch" every mutant). A mutant is caught when its tests fail (pytest exit
status 1); it SURVIVED when they pass; anything else (a test id that does not exist, a
collection error, a timeout) is an ERROR. The script prints a table and exits non-zero if any
mutant survived or errored.

This file is not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORACLE = "tests/test_oracles.py::"
GENERATE = "tests/test_generate.py::test_greedy_tokens_equal_transformers_generate"
ONE_TOKEN = (
    "tests/test_generate.py::test_one_token_kernels_compute_every_ddl_update_of_a_batch_one_step"
)
TIMEOUT = 1200  # seconds per pytest run


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    file: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]


MUTANTS = [
    # the harness itself: a mutant every test notices (the copy's code is what runs)
    Mutant(
        "canary",
        "the mutated copy is the code under test",
        "passes/rewrites/altup.py",
        'OWNER = "altup"',
        'OWNER = "altup-canary"',
        (ORACLE + "test_altup_k1_is_the_identity_rewrite",),
    ),
    # altup ---------------------------------------------------------------------------------
    Mutant(
        "altup-schedule-block0",
        "altup: layer l computes on block l mod K",
        "passes/rewrites/altup.py",
        'return unit % self.k if self.schedule == "alternating" else self.active',
        'return 0 if self.schedule == "alternating" else self.active',
        (ORACLE + "test_altup_layer_l_reads_and_writes_its_block[k3-alternating]",),
    ),
    Mutant(
        "altup-same-ignores-active",
        "altup: schedule=same computes on block `active`",
        "passes/rewrites/altup.py",
        'return unit % self.k if self.schedule == "alternating" else self.active',
        'return unit % self.k if self.schedule == "alternating" else 0',
        (ORACLE + "test_altup_layer_l_reads_and_writes_its_block[k3-same-1]",),
    ),
    Mutant(
        "altup-gain-0.98-fp32",
        "altup: g = 1 at init (exact), fp32 certificate",
        "passes/rewrites/altup.py",
        "torch.ones(k, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        "torch.full((k,), 0.98, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        (
            "tests/test_altup.py::test_k1_is_the_identity[tiny-llama]",
            "tests/test_precision.py::test_altup_gain_error_rejected_in_every_dtype[dtype0]",
        ),
    ),
    Mutant(
        "altup-gain-0.98-bf16",
        "altup: g = 1 at init, bf16 certificate",
        "passes/rewrites/altup.py",
        "torch.ones(k, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        "torch.full((k,), 0.98, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        ("tests/test_precision.py::test_altup_gain_error_rejected_in_every_dtype[dtype1]",),
    ),
    Mutant(
        "altup-gain-0.98-fp16",
        "altup: g = 1 at init, fp16 certificate",
        "passes/rewrites/altup.py",
        "torch.ones(k, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        "torch.full((k,), 0.98, dtype=self.dtype), fresh=True)\n            gain = em.op(aten.view.default, g, [k] + [1] * unit.rank)",
        ("tests/test_precision.py::test_altup_gain_error_rejected_in_every_dtype[dtype2]",),
    ),
    Mutant(
        "altup-predict-not-identity",
        "altup: P = I at init (rows summing to 1 would still be exact)",
        "passes/rewrites/altup.py",
        "torch.eye(k, dtype=self.dtype), fresh=True)",
        "torch.eye(k, dtype=self.dtype) * 0.9 + 0.1 / k, fresh=True)",
        (ORACLE + "test_altup_blocks_identical_at_init_and_coefficients_get_gradients",),
    ),
    Mutant(
        "altup-readout-first-block",
        "altup: the model reads the mean of the K blocks",
        "passes/engines/residual.py",
        "return em.op(aten.add.Tensor, x0, spread)",
        "return x0",
        (ORACLE + "test_altup_layer_l_reads_and_writes_its_block[k2-alternating]",),
    ),
    Mutant(
        "altup-router-init",
        "altup(coefficients=router): W_p = W_c = 0 at init (exact)",
        "passes/rewrites/altup.py",
        "torch.zeros(k * k, k, dtype=self.dtype)",
        "torch.full((k * k, k), 0.01, dtype=self.dtype)",
        ("tests/test_altup.py::test_exact_at_init_with_replicated_blocks[tiny-llama]",),
    ),
    Mutant(
        "altup-readout-sum-eps",
        "altup(readout=sum): the final norm's eps × K²",
        "passes/engines/residual.py",
        "_scale_eps(norm, sum_of**2)",
        "_scale_eps(norm, sum_of)",
        ("tests/test_altup.py::test_readout_sum_rescales_the_final_norm",),
    ),
    # hc, mhc, resi-dual --------------------------------------------------------------------
    Mutant(
        "hc-read-weights-sum-below-one",
        "hc: A_m = e_{l mod n} at init (the read weights sum to 1)",
        "passes/rewrites/hc.py",
        "a[unit.index % n] = 1.0",
        "a[unit.index % n] = 0.9",
        (
            "tests/test_hyper_connections.py::test_exact_at_init_with_replicated_streams[tiny-llama]",
        ),
    ),
    Mutant(
        "hc-dynamic-carry-transposed",
        "hc(dynamic): r_ij += s tanh(H̄_i W_r)_j (stream i's row)",
        "passes/rewrites/hc.py",
        "r = em.op(aten.permute.default, r, [0, rank, *range(1, rank)])",
        "r = em.op(aten.permute.default, r, [rank, 0, *range(1, rank)])",
        ("tests/test_hyper_connections.py::test_hc_update_oracle[True]",),
    ),
    Mutant(
        "hc-inserted-layer-copies-its-carry",
        "hc: a layer add-layers inserts starts with A_r = I (declared fresh), not its neighbour's",
        "passes/rewrites/hc.py",
        'em.param(f"{name}.carry", torch.eye(n, dtype=self.dtype), fresh=True)',
        'em.param(f"{name}.carry", torch.eye(n, dtype=self.dtype))',
        (
            "tests/test_hyper_connections.py::test_add_layers_after_mhc_is_refused_when_parsed_and_allowed_after_hc",
        ),
    ),
    Mutant(
        "mhc-sinkhorn-ends-on-rows",
        "mhc: Sinkhorn-Knopp normalises rows, then columns (columns exact)",
        "ir/sinkhorn.py",
        "a.div_(a.sum(1, keepdim=True))\n        a.div_(a.sum(0, keepdim=True))",
        "a.div_(a.sum(0, keepdim=True))\n        a.div_(a.sum(1, keepdim=True))",
        ("tests/test_hyper_connections.py::test_mhc_update_oracle_and_doubly_stochastic_mixing",),
    ),
    Mutant(
        "sinkhorn-backward-drops-the-sum-term",
        "archfx::sinkhorn's backward: a step b = a / s goes back as (∂b − Σ ∂b ⊙ b) / s",
        "ir/sinkhorn.py",
        "g = g.sub((g * b).sum(axis, keepdim=True)).div_(s)",
        "g = g.div(s)",
        (
            "tests/test_hyper_connections.py::"
            "test_the_sinkhorn_op_is_the_chain_it_replaces_with_its_gradient",
        ),
    ),
    Mutant(
        "mhc-post-gain-not-one",
        "mhc: H_post = 2σ(0) = 1 at init",
        "passes/rewrites/mhc.py",
        "em.op(aten.sigmoid.default, logits(1, n, 2 * n, torch.zeros(n, dtype=dt))),\n            2.0,",
        "em.op(aten.sigmoid.default, logits(1, n, 2 * n, torch.zeros(n, dtype=dt))),\n            1.0,",
        ("tests/test_hyper_connections.py::test_exact_at_init_with_replicated_streams[tiny-gpt2]",),
    ),
    Mutant(
        "resi-dual-accumulates-the-stream",
        "resi-dual: x_d accumulates the sublayer outputs, unnormalised",
        "passes/rewrites/resi_dual.py",
        "em.op(aten.add.Tensor, self.acc[unit.stack], unit_out)",
        "em.op(aten.add.Tensor, self.acc[unit.stack], state)",
        ("tests/test_resi_dual.py::test_accumulator_oracle",),
    ),
    Mutant(
        "resi-dual-gain-starts-at-one",
        "resi-dual: LN_f's gain starts at 0 (exact)",
        "passes/rewrites/resi_dual.py",
        'gain = em.param(f"s{stack}.norm_weight", torch.zeros(self.d, dtype=self.dtype))',
        'gain = em.param(f"s{stack}.norm_weight", torch.ones(self.d, dtype=self.dtype))',
        (
            "tests/test_resi_dual.py::test_exact_on_post_ln_models_and_refused_on_the_others[tiny-bert]",
        ),
    ),
    Mutant(
        "scheme-site-record-longest-path",
        "engine: a site update records the direct path to its stream (growth inserts nodes "
        "in the coefficient paths)",
        "passes/engines/residual.py",
        "n, path = todo.popleft()",
        "n, path = todo.pop()",
        ("tests/test_hyper_connections.py::test_growth_after_a_trained_scheme_is_exact",),
    ),
    Mutant(
        "scheme-last-post-norm-not-on-the-state",
        "engine: the last block's post-norm acts on the state; the readout follows it",
        "passes/engines/residual.py",
        "lifted = _lift(unit, unit.block.output, state, scheme, strict=False)",
        "lifted = set()",
        ("tests/test_hyper_connections.py::test_growth_after_a_trained_scheme_is_exact",),
    ),
    # ddl -----------------------------------------------------------------------------------
    Mutant(
        "ddl-code-2sigma",
        "ddl value=code: v = 4σ(W_v x_in + b)",
        "passes/rewrites/ddl.py",
        "em.op(aten.sigmoid.default, em.op(aten.linear.default, src, wv, b)),\n            4.0,",
        "em.op(aten.sigmoid.default, em.op(aten.linear.default, src, wv, b)),\n            2.0,",
        (ORACLE + "test_ddl_update_is_the_value_modes_formula[code-1-1e-05]",),
    ),
    Mutant(
        "ddl-paper-value-unnormalised",
        "ddl value=paper: v = W_v c (c the normalised input)",
        "passes/rewrites/ddl.py",
        'src = cf if self.value != "code" else',
        'src = cf if self.value == "compat" else',
        (ORACLE + "test_ddl_update_is_the_value_modes_formula[paper-1-1e-05]",),
    ),
    Mutant(
        "ddl-compat-gate-lambda",
        "ddl value=compat: x + λh + (1 − λ)β(v − kᵀx)k",
        "passes/rewrites/ddl.py",
        "gate = em.op(aten.mul.Tensor, em.op(aten.rsub.Scalar, lam, 1.0), beta)",
        "gate = em.op(aten.mul.Tensor, em.op(aten.rsub.Scalar, lam, 1.0), 1.0)",
        (ORACLE + "test_ddl_update_is_the_value_modes_formula[compat-1-1e-05]",),
    ),
    Mutant(
        "ddl-lambda-init",
        "ddl value=compat: λ = 1 at init",
        "passes/rewrites/ddl.py",
        'em.param(f"{name}.lam", torch.ones(1, dtype=self.dtype))',
        'em.param(f"{name}.lam", torch.full((1,), 0.99, dtype=self.dtype))',
        (ORACLE + "test_ddl_k_unit_norm_beta_in_range_and_lambda_gets_gradient",),
    ),
    Mutant(
        "ddl-beta0-bias",
        "ddl: b_β = logit(β0/2), so β = β0 at init (β0 = 1 cannot tell)",
        "passes/rewrites/ddl.py",
        "math.log(self.beta0 / (2 - self.beta0))",
        "math.log(self.beta0)",
        (ORACLE + "test_ddl_gate_starts_at_beta0_and_shrinks_the_error_by_one_minus_beta[0.5]",),
    ),
    Mutant(
        "ddl-beta-range",
        "ddl: β = 2σ(·) ∈ (0, 2)",
        "passes/rewrites/ddl.py",
        "em.op(aten.sigmoid.default, logit), 2.0)",
        "em.op(aten.sigmoid.default, logit), 1.0)",
        (ORACLE + "test_ddl_gate_starts_at_beta0_and_shrinks_the_error_by_one_minus_beta[1.0]",),
    ),
    Mutant(
        "ddl-k-eps",
        "ddl: k = h / sqrt(‖h‖² + ε²)",
        "passes/rewrites/ddl.py",
        "norm2, self.eps**2)",
        "norm2, self.eps)",
        (ORACLE + "test_ddl_update_is_the_value_modes_formula[paper-1-0.5]",),
    ),
    Mutant(
        "ddl-compressor-weights",
        "ddl(dv > 1): a block reads the mean of the channels (weights 1/d_v)",
        "passes/rewrites/ddl.py",
        "torch.full((dv - 1, d), 1.0 / dv, dtype=self.dtype)",
        "torch.full((dv - 1, d), 1.0 / (dv - 1), dtype=self.dtype)",
        (ORACLE + "test_ddl_blocks_read_the_mean_of_the_channels",),
    ),
    Mutant(
        "ddl-one-token-k-unnormalised",
        "ddl one-token kernel: the error v − kᵀX with k = r·h",
        "passes/rewrites/ddl.py",
        "s = beta * r * (v - r * torch.dot(hv, x).item())",
        "s = beta * r * (v - torch.dot(hv, x).item())",
        (ONE_TOKEN + "[ddl(value=paper,beta0=0.7)]",),
    ),
    Mutant(
        "ddl-one-token-lambda",
        "ddl one-token kernel, compat: s = λ + (1 − λ)·s",
        "passes/rewrites/ddl.py",
        "s = lam_ + (1.0 - lam_) * s",
        "s = lam_ + s",
        (ONE_TOKEN + "[ddl(dv=1,value=compat)]",),
    ),
    # growth --------------------------------------------------------------------------------
    Mutant(
        "expand-mlp-sides-swapped",
        "expand-mlp: new up/gate rows drawn, new down columns zero",
        "passes/rewrites/expand_mlp.py",
        'Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"])',
        'Growth(sizes, dict.fromkeys(sizes, "zero"), seed=self.opts["seed"])',
        (ORACLE + "test_growth_zero_and_drawn_sides[expand-mlp(factor=2)]",),
    ),
    Mutant(
        "add-heads-sides-swapped",
        "add-heads: new q rows drawn, new o columns zero",
        "passes/rewrites/add_heads.py",
        'Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"])',
        'Growth(sizes, dict.fromkeys(sizes, "zero"), seed=self.opts["seed"])',
        (ORACLE + "test_growth_zero_and_drawn_sides[add-heads(n=2)]",),
    ),
    Mutant(
        "expand-head-dim-sides-swapped",
        "expand-head-dim: new v rows drawn, new o columns zero",
        "passes/rewrites/expand_head_dim.py",
        'Growth(sizes, dict.fromkeys(sizes, "free"), seed=self.opts["seed"])',
        'Growth(sizes, dict.fromkeys(sizes, "zero"), seed=self.opts["seed"])',
        (ORACLE + "test_growth_zero_and_drawn_sides[expand-head-dim(size=24)]",),
    ),
    Mutant(
        "expand-qk-double-zero",
        "expand-qk: new q rows drawn, new k rows zero (not both zero)",
        "passes/rewrites/expand_qk.py",
        'modes[atom] = "zero" if a.qk_norm else "free"',
        'modes[atom] = "zero"',
        (ORACLE + "test_every_new_entry_gets_a_gradient[expand-qk(size=24)]",),
    ),
    Mutant(
        "expand-qk-rescale-dropped",
        "expand-qk: old k rows × √(k̂/k) where the scale is 1/√k",
        "passes/rewrites/expand_qk.py",
        "f = math.sqrt(size / d.size[dqk])",
        "f = 1.0",
        (ORACLE + "test_growth_zero_and_drawn_sides[expand-qk(size=24)]",),
    ),
    Mutant(
        "expand-qk-fixed-scale-rescaled",
        "expand-qk: a fixed attention scale (T5's 1) is kept, keys not rescaled",
        "passes/rewrites/expand_qk.py",
        "return scale is None or abs(scale * math.sqrt(k) - 1) < 1e-6",
        "return True",
        (ORACLE + "test_expand_qk_keeps_a_fixed_scale",),
    ),
    Mutant(
        "expand-hidden-gain-rescale",
        "expand-hidden (RMSNorm): gains × √(d/d̂)",
        "passes/engines/growth.py",
        "out[found[0]] = (found[1], math.sqrt(ratio))",
        "out[found[0]] = (found[1], 1.0)",
        (ORACLE + "test_growth_zero_and_drawn_sides[expand-hidden(size=48)]",),
    ),
    Mutant(
        "expand-hidden-eps",
        "expand-hidden (RMSNorm): eps × d/d̂",
        "passes/engines/growth.py",
        "edits.append((eps, 1, eps.args[1] * ratio))",
        "edits.append((eps, 1, eps.args[1]))",
        (ORACLE + "test_expand_hidden_rms_norm_eps_follows_the_width",),
    ),
    Mutant(
        "expand-hidden-unit-offset",
        "expand-hidden ((1 + w) RMSNorm): w' = (1 + w)·√(d/d̂) − 1",
        "passes/engines/growth.py",
        "- 1 if offset else",
        "- 1 if False else",
        (ORACLE + "test_expand_hidden_unit_offset_gains",),
    ),
    Mutant(
        "expand-hidden-duplicate-no-noise",
        "expand-hidden (duplicate): readers W/m per copy plus zero-sum noise",
        "passes/engines/growth.py",
        "new = torch.where(per > 1, new / per + eps, new)",
        "new = torch.where(per > 1, new / per, new)",
        (ORACLE + "test_expand_hidden_duplicates_layernorm_streams",),
    ),
    Mutant(
        "expand-hidden-tied-final-norm",
        "expand-hidden (duplicate, tied head): final norm gain and bias ÷ m",
        "passes/engines/growth.py",
        "out = {norm.weight: 1 / m}",
        "out = {norm.weight: 1.0}",
        (ORACLE + "test_expand_hidden_duplicates_layernorm_streams",),
    ),
    Mutant(
        "growth-engine-double-zero",
        "growth: producers of free features drawn (never both sides zero)",
        "passes/engines/growth.py",
        "fill = noise.masked_fill_(zero_feat, 0)",
        "fill = noise.zero_()",
        (ORACLE + "test_every_new_entry_gets_a_gradient[expand-mlp(factor=2)]",),
    ),
    Mutant(
        "growth-draw-scale",
        "growth: new entries drawn at the scale of the existing weights",
        "passes/engines/growth.py",
        "spread = _scale(t)",
        "spread = 1.0",
        (ORACLE + "test_growth_zero_and_drawn_sides[expand-mlp(factor=2)]",),
    ),
    Mutant(
        "expand-qk-rope-frequencies",
        "expand-qk (RoPE): new pairs continue the geometric sequence of frequencies",
        "passes/engines/growth.py",
        "ratio ** torch.arange(1, n_new + 1,",
        "ratio ** torch.arange(0, n_new,",
        ("tests/test_growth.py::test_rope_keeps_old_frequencies_and_continues_the_sequence",),
    ),
    Mutant(
        "add-layers-bias-not-zeroed",
        "add-layers: o/down and their biases zero",
        "passes/rewrites/add_layers.py",
        "for t in (lin.weight, lin.bias) if t",
        "for t in (lin.weight,) if t",
        (ORACLE + "test_add_layers_copies_the_neighbour_with_zero_writers[tiny-gpt2]",),
    ),
    Mutant(
        "add-layers-zero-reader",
        "add-layers: the writers (o), not the readers (q), are zero",
        "passes/rewrites/add_layers.py",
        "linears.append(r.attention.o)",
        "linears.append(r.attention.q)",
        (ORACLE + "test_add_layers_copies_the_neighbour_with_zero_writers[tiny-llama]",),
    ),
    Mutant(
        "save-pretrained-stale-weights",
        "save_pretrained: the checkpoint holds the grown weights (generation unchanged)",
        "passes/io/hf_export.py",
        "if k in persistent:\n                own[k].copy_(v)",
        'if k in persistent and "mlp" not in k:\n                own[k].copy_(v)',
        (
            ORACLE
            + "test_grown_checkpoint_generates_the_same_with_and_without_kv_cache[tiny-llama]",
        ),
    ),
    # sdnc, the certificate -----------------------------------------------------------------
    Mutant(
        "sdnc-scale",
        "sdnc: the read's strength is the model's own scale",
        "passes/engines/attention_memory.py",
        "scale *= factor",
        "scale *= 1.01 * factor",
        ("tests/test_sdnc.py::test_sdnc_is_exact_everywhere[nanogpt]",),
    ),
    Mutant(
        "sdnc-cosine-strength-init",
        "sdnc(addressing=cosine): β starts at √d_k",
        "passes/rewrites/sdnc.py",
        "b0 = math.log(math.expm1(math.sqrt(dk) - 1))",
        "b0 = math.log(math.expm1(math.sqrt(dk)))",
        ("tests/test_sdnc.py::test_cosine_addressing_is_the_dncs",),
    ),
    Mutant(
        "delta-reads-before-write",
        "sdnc(write=delta): token t reads the memory after its own write",
        "ir/memory.py",
        "masked_fill(~ones.tril(), 0)",
        "masked_fill(~ones.tril(-1), 0)",
        ("tests/test_sdnc.py::test_the_chunked_delta_scan_is_the_token_by_token_delta_rule",),
    ),
    Mutant(
        "delta-chunk-start",
        "sdnc(write=delta): a chunk's written values are measured against its starting memory",
        "ir/memory.py",
        "u = u0[:, :, i] - w[:, :, i] @ state",
        "u = u0[:, :, i]",
        ("tests/test_sdnc.py::test_the_chunked_delta_scan_is_the_token_by_token_delta_rule",),
    ),
    Mutant(
        "public-op-wrong-function",
        "generation in eager PyTorch: an op retargeted to a public function that computes another",
        "ir/ops.py",
        "aten.sub.Tensor: torch.sub,",
        "aten.sub.Tensor: torch.add,",
        (
            "tests/test_generate.py::"
            "test_the_eager_form_calls_public_torch_functions_and_computes_the_same_bits",
        ),
    ),
    Mutant(
        "certificate-math-tolerance",
        "certificate: the fp64 math agrees within 1e-9 of each output's scale",
        "ir/verify.py",
        "MATH_TOLERANCE = {torch.float64: 1e-9,",
        "MATH_TOLERANCE = {torch.float64: 1e-1,",
        (
            ORACLE + "test_certificate_rejects_altup_with_gain_off_by_two_percent",
            "tests/test_precision.py::test_altup_gain_error_rejected_in_every_dtype[dtype1]",
        ),
    ),
    Mutant(
        "certificate-rounding-bound",
        "certificate: new parameters are the fp64 rewrite rounded once (half an ulp)",
        "ir/verify.py",
        "u = info.eps / 2 +",
        "u = 8 * info.eps +",
        (
            "tests/test_precision.py::test_one_percent_growth_error_rejected_in_every_dtype[expand-mlp(factor=2)-dtype1]",
        ),
    ),
    # recognition (issue 16): each rule of the analysis and the gate, broken
    Mutant(
        "gate-off",
        "consistency gate: a residual site outside every block makes the structure partial",
        "ir/consistency.py",
        "unrecognised.extend(skipped)",
        "return",
        ("tests/test_recognition.py::test_a_partial_structure_is_shown_and_refused",),
    ),
    Mutant(
        "repeated-call-merged",
        "one module applied again is a new block (weights shared across depth)",
        "ir/recognise/blocks.py",
        "or len(by_path[c.path]) > 1",
        "or False",
        (
            "tests/test_recognition.py::"
            "test_one_module_applied_three_times_is_three_blocks_that_share_weights",
        ),
    ),
    Mutant(
        "attribute-blocks",
        "same-class sibling attributes are blocks",
        "ir/recognise/blocks.py",
        'or len(siblings[(c.path.rpartition(".")[0], c.kind)]) > 1',
        "or False",
        ("tests/test_recognition.py::test_blocks_held_as_named_attributes",),
    ),
    Mutant(
        "einsum-kept",
        "capture turns batched-matmul einsums into matmuls (attention written with einsum)",
        "ir/capture.py",
        "    _einsum_as_matmul(gm)\n",
        "",
        ("tests/test_recognition.py::test_einsum_attention_is_attention",),
    ),
    Mutant(
        "no-period-merge",
        "alternating single-site blocks are merged into layers",
        "ir/recognise/blocks.py",
        "        for p in range(2, len(blocks) // 2 + 1):",
        "        for p in range(len(blocks), len(blocks)):",
        ("tests/test_thirdparty.py::test_structure_is_the_librarys_or_refused[xt-gqa-swiglu]",),
    ),
    Mutant(
        "relu2-as-relu",
        "activations are named by their arithmetic (relu² is not relu)",
        "ir/recognise/mlp.py",
        'return "relu2" if squared else "relu"',
        'return "relu"',
        (
            "tests/test_recognition.py::"
            "test_activations_named_by_what_they_compute[xt-tied-relu2-relu2]",
        ),
    ),
    Mutant(
        "user-model-left-fake",
        "capture leaves the user's model as it was",
        "ir/capture.py",
        "        _restore(model, state)\n",
        "",
        ("tests/test_thirdparty.py::test_capture_leaves_the_users_model_as_it_was",),
    ),
    Mutant(
        "tied-head-norm",
        "duplication divides the gain of the norm the tied head reads (BART: the last post-norm)",
        "passes/engines/growth.py",
        "    out = {norm.weight: 1 / m}\n",
        "    out = {}\n",
        ("tests/test_growth.py::test_each_growth_is_exact_or_refused_with_its_reason[tiny-bart]",),
    ),
    Mutant(
        "gainless-rms-norm-unscaled",
        "zero-padding under a gainless rms_norm (AltUp's router) scales its output by √(d̂/d)",
        "passes/engines/growth.py",
        "gainless.append((r.node, math.sqrt(ratio)))",
        "gainless.append((r.node, 1.0))",
        ("tests/test_growth.py::test_gainless_rms_norm_output_is_rescaled_under_zero_padding",),
    ),
    Mutant(
        "tied-head-input-scale",
        "duplication scales the tied head's input by 1/m where no norm gain precedes it",
        "passes/engines/growth.py",
        "return _insert_scale(graph, x, 1 / m, readers, linear.node)",
        "return _insert_scale(graph, x, 1.0, readers, linear.node)",
        (
            "tests/test_growth.py::test_tied_head_after_altup_on_a_post_ln_model_reads_a_scaled_input",
        ),
    ),
    Mutant(
        "inserted-altup-layer-copies-coefficients",
        "add-layers after altup: the new layer's coefficients start at the identity",
        "passes/rewrites/altup.py",
        'p = em.param(f"{name}.predict", torch.eye(k, dtype=self.dtype), fresh=True)',
        'p = em.param(f"{name}.predict", torch.eye(k, dtype=self.dtype))',
        (
            "tests/test_composition.py::test_inserted_layers_after_altup_are_altup_layers_"
            "started_at_the_identity[altup(k=2)]",
        ),
    ),
    Mutant(
        "copied-scheme-parameter-forgets-its-scheme",
        "a copy of a copy owns its scheme parameters (the copy's get_attr keeps the meta)",
        "passes/rewrites/add_layers.py",
        "            attrs[node.target].meta = dict(node.meta)",
        "            pass",
        (
            "tests/test_composition.py::test_inserted_layers_after_altup_are_altup_layers_"
            "started_at_the_identity[altup(k=2)]",
        ),
    ),
    Mutant(
        "onnx-near-zero-constant-dropped",
        "the ONNX export keeps additions of constants near zero (DDL's ε² = 1e-10)",
        "ir/lower.py",
        "                exact_no_ops(),\n",
        "",
        ("tests/test_composition.py::test_a_new_ddl_layer_exports_to_onnx",),
    ),
    # generation with a key/value cache (passes/engines/decode.py, passes/io/generate.py)
    Mutant(
        "decode-padding-read",
        "a query never reads a padding slot",
        "passes/engines/decode.py",
        "seen = _node(g, like, aten.logical_and.default, (causal, real))",
        "seen = causal",
        (GENERATE + "[tiny-llama-altup(k=2)]",),
    ),
    Mutant(
        "decode-padding-row-masked",
        "a padding row reads its own slot (finite: no NaN reaches the tokens)",
        "passes/engines/decode.py",
        "return _node(g, like, aten.logical_or.default, (seen, own))",
        "return seen",
        (GENERATE + "[family:gemma2-canonicalize]",),
    ),
    Mutant(
        "generate-positions-count-padding",
        "positions count the tokens that are not padding (transformers' rule)",
        "passes/engines/decode.py",
        "return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -q:]",
        "return torch.arange(mask.shape[1]).expand_as(mask)[:, -q:]",
        (GENERATE + "[tiny-gpt2-altup(k=2)]",),
    ),
    Mutant(
        "generate-onnx-cache-dropped",
        "ONNX Runtime's cache outputs are the next call's inputs",
        "passes/io/generate.py",
        "        self.cache = list(values[-len(self.past) :])\n",
        "",
        (
            "tests/test_generate.py::test_onnx_runtime_generates_the_same_tokens[tiny-llama-altup(k=2)]",
        ),
    ),
    Mutant(
        "generate-first-position",
        "the prefill's one row of logits is the last position's",
        "passes/engines/decode.py",
        "(h, 1, -1, 2**63 - 1)",
        "(h, 1, 0, 1)",
        ("tests/test_generate.py::test_generation_projects_the_last_position_only[tiny-llama]",),
    ),
    Mutant(
        "gqa-read-heads-misgrouped",
        "a GQA read pairs query head h with bank h // g",
        "ir/memory.py",
        "        query.reshape(b, hk, g * n, d),",
        "        query.transpose(1, 2).reshape(b, hk, g * n, d),",
        (
            "tests/test_sdnc.py::test_a_gqa_read_equals_reading_repeated_banks",
            "tests/test_generate.py::test_onnx_runtime_generates_the_same_tokens[tiny-llama-altup(k=2)]",
        ),
    ),
    # composition -----------------------------------------------------------------------------
    Mutant(
        "inserted-layer-shares-gates",
        "add-layers gives a copied layer's DDL updates parameters of their own",
        "passes/rewrites/add_layers.py",
        'if target.startswith(prefix) or "archfx_scheme" in node.meta:',
        "if target.startswith(prefix):",
        (
            "tests/test_composition.py::test_inserted_layers_own_their_scheme_parameters[ddl(dv=1,value=compat),add-layers(n=2)]",
        ),
    ),
    Mutant(
        "site-update-not-a-site",
        "the analysis reads a site scheme's update as the residual add it replaced",
        "ir/analyze.py",
        "            return [self.writes[n][0], self.writes[n][2]]",
        "            return None",
        (
            "tests/test_composition.py::test_the_structure_survives_the_schemes[ddl(dv=1)-tiny-gpt2]",
        ),
    ),
]


# running ---------------------------------------------------------------------------------

BOOT = (
    "import os, sys; here = os.path.realpath(os.getcwd()); sys.path.insert(0, here); "
    "import archfx.ir, archfx.passes; "
    "where = [os.path.realpath(m.__file__) for m in (archfx.ir, archfx.passes)]; "
    "assert all(w.startswith(here + os.sep) for w in where), ('archfx imported from', where); "
    "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)


def repo_files() -> list[str]:
    """The working tree's files: tracked ones that exist, and untracked ones git keeps."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


def make_copy(files: list[str], mutant: Mutant | None) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f"archfx-mutant-{mutant.name if mutant else 'base'}-"))
    for f in files:
        dst = tmp / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    pkg = tmp / "archfx"  # the package layout the editable install maps: archfx.ir, archfx.passes
    pkg.mkdir()
    (pkg / "ir").symlink_to(tmp / "ir", target_is_directory=True)
    (pkg / "passes").symlink_to(tmp / "passes", target_is_directory=True)
    if mutant is not None:
        path = tmp / mutant.file
        text = path.read_text()
        count = text.count(mutant.snippet)
        if count != 1:
            shutil.rmtree(tmp)
            raise StaleMutant(f"snippet found {count} times in {mutant.file}")
        path.write_text(text.replace(mutant.snippet, mutant.replacement))
    return tmp


class StaleMutant(Exception):
    pass


def run_tests(copy: Path, tests: list[str]) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "PYTHONDONTWRITEBYTECODE": "1",
        "COLUMNS": "300",  # pytest cuts its failure summary to the terminal width
        # a caught mutant's failing pass leaves a reproducer: keep it in the copy, not the cache
        "ARCHFX_CACHE": str(copy / ".archfx-cache"),
    }
    cmd = [
        sys.executable,
        "-c",
        BOOT,
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",  # run the named tests even when marked slow
        "--rootdir",
        str(copy),
        *tests,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s"
    return proc.returncode, proc.stdout + proc.stderr


def last_lines(text: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def verdict(rc: int, output: str) -> str:
    if rc == 1:
        return "caught"
    if rc == 0:
        return "SURVIVED"
    if "not found" in output or "no match" in output:
        return "ERROR: test id not found"
    return f"ERROR: pytest exit {rc}: {last_lines(output)}"


def evidence(output: str) -> str:
    """The first failure pytest reports: the test (without its file) and the error's first line."""
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line[len("FAILED ") :].split("::", 1)[-1]
    return ""


def run_mutant(files: list[str], m: Mutant, keep: bool) -> tuple[Mutant, str, str, float]:
    t0 = time.perf_counter()
    try:
        copy = make_copy(files, m)
    except StaleMutant as exc:
        return m, f"ERROR: stale mutant ({exc})", "", 0.0
    try:
        rc, output = run_tests(copy, list(m.tests))
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)
    result = verdict(rc, output)
    if result.startswith("ERROR") or os.environ.get("MUTANTS_VERBOSE"):
        print(f"--- {m.name}\n{output[-3000:]}", file=sys.stderr)
    return m, result, evidence(output), time.perf_counter() - t0


def table(rows: list[tuple[Mutant, str, str, float]]) -> str:
    head = ("mutant", "claim", "result", "first failure (the evidence)", "s")
    body = [(m.name, m.claim, r, e, f"{s:.0f}") for m, r, e, s in rows]
    limits = [40, 80, 40, 90, 5]
    widths = [min(max(len(x[i]) for x in [head, *body]), limits[i]) for i in range(5)]

    def line(cells):
        return (
            "| " + " | ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(cells)) + " |"
        )

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule, *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains one of A,B,…")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run at once (default 2)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if any(k in m.name for k in args.k.split(","))]
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if args.list:
        for m in chosen:
            print(f"{m.name:34} {m.file:24} {m.claim}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.k!r}", file=sys.stderr)
        return 2
    files = repo_files()
    t0 = time.perf_counter()
    for m in chosen:  # say at once which mutants are stale (they are reported as errors)
        count = (ROOT / m.file).read_text().count(m.snippet)
        if count != 1:
            print(
                f"stale mutant {m.name}: snippet found {count} times in {m.file}", file=sys.stderr
            )
    if not args.no_baseline:
        tests = sorted({t for m in chosen for t in m.tests})
        copy = make_copy(files, None)
        try:
            rc, output = run_tests(copy, tests)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        if rc != 0:
            print(output[-5000:], file=sys.stderr)
            print(
                f"the unmutated code fails the mutants' tests (pytest exit {rc}): fix that first",
                file=sys.stderr,
            )
            return 2
        print(
            f"baseline: {len(tests)} tests pass on the unmutated copy "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_mutant, files, m, args.keep) for m in chosen]
        rows = []
        for f in futures:
            rows.append(f.result())
            m, r, e, s = rows[-1]
            print(f"{m.name}: {r} ({s:.0f} s) {e}", file=sys.stderr)
    print(table(rows))
    bad = [m.name for m, r, _, _ in rows if r != "caught"]
    print(
        f"\n{len(rows) - len(bad)}/{len(rows)} mutants caught in {time.perf_counter() - t0:.0f} s"
        + (f"; not caught: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
