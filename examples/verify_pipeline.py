"""Run a pipeline of passes with a numerical certificate after every preserving pass.

python examples/verify_pipeline.py [BUILTIN] [--pipeline TEXT]
"""

import argparse

from archfx.ir import capture
from archfx.passes import Pipeline
from archfx.passes.io.zoo import build


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="tiny-gpt2")
    ap.add_argument("--pipeline", default="canonicalize")
    args = ap.parse_args(argv)

    graph = capture(build(args.model))
    pipeline = Pipeline.parse(args.pipeline)
    result = pipeline.run(graph, verify=True)  # the input graph is never modified
    for record in result.records:
        cert = record.certificate
        print(
            f"{record.name}: changed={record.changed} nodes {record.nodes_before}→{record.nodes_after} "
            f"fp64 {cert.math_diff:.1e} of each output's scale (allowed {cert.tolerance:g}), "
            f"model dtype max|Δ|={cert.max_abs_diff:.1e} on {cert.input_sets}"
        )
        for remark in record.remarks:
            print(f"  remark: {remark}")
    whole = result.certificate  # input against final output, from the same runs
    print(
        f"pipeline {pipeline}: fp64 {whole.math_diff:.1e} (allowed {whole.tolerance:g}), "
        f"max|Δ| = {whole.max_abs_diff:.1e} in the model's dtype"
    )
    assert whole.ok
    return result


if __name__ == "__main__":
    main()
