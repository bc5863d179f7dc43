"""Your own LoRA init in ~20 lines: register it, and caching, Hub push/pull and conversion come for free.

    python examples/custom_variant.py                              # tiny model built locally
    python examples/custom_variant.py --push my-org/tiny-projection  # also push the factor set (needs a token)

The variant below starts LoRA from W0 projected onto a random r-dimensional subspace of its inputs and, like
PiSSA, freezes the rest as the residual `W0 − s·B·A`, so the model's outputs are unchanged at init.
"""

import argparse

import torch

from inilora_hf import FactorSet, ModuleFactors, VariantInputs, convert, inilora_init, register_variant
from inilora_hf.cli.demo import build_demo_base


# ---- the variant: target weights in, initial factors out (no PEFT, no files) ---------------------------------
@register_variant(
    "random-projection",
    residual=True,  # the base weight becomes W0 − s·B·A (False: W0 untouched, like plain LoRA)
    defaults={"seed": 0},  # every option the variant accepts; part of the cache key
    description="A = r random orthonormal rows, B = (W0 / s)·Aᵀ; base becomes W0 − s·B·A.",
)
def random_projection(inputs: VariantInputs) -> dict[str, ModuleFactors]:
    rank, scaling = inputs.config.rank, inputs.config.scaling
    generator = torch.Generator().manual_seed(inputs.config.options["seed"])
    factors = {}
    for name in sorted(inputs.weights):  # module name → fp32 W0 (out, in)
        weight = inputs.weights[name]
        basis = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=generator)).Q  # (in, r)
        factors[name] = ModuleFactors(lora_A=basis.T.contiguous(), lora_B=(weight / scaling) @ basis)
    return factors


# --------------------------------------------------------------------------------------------------------------


parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="Hub id or directory (default: a tiny Llama built locally)")
parser.add_argument("--output-dir", default="custom-variant-out")
parser.add_argument("--push", default=None, help="Hub repo id to push the factor set to")
args = parser.parse_args()

model_path = args.model or str(build_demo_base(f"{args.output_dir}/base"))
init = inilora_init(model_path, variant="random-projection", rank=8, seed=0)
model = init()  # computed and cached; a second run (or init()) loads it from the cache
print(f"factors: {init.factor_source}")
print(model.init_report.summary())

if args.push:
    init.factor_set.push_to_hub(args.push)  # factors, metadata, model card, plain-PEFT init_adapter/
    same = FactorSet.from_pretrained(args.push)  # anyone can pull it: inilora_init(base, factors=args.push)
    print(f"pushed and pulled {args.push}: {len(same.factors)} modules")

# A few training steps (any Trainer works the same way: Trainer(model_init=init, ...)).
ids = torch.randint(4, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(5):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

# Back to files that plain transformers / peft load, without inilora_hf.
convert.to_merged(model, f"{args.output_dir}/merged", overwrite=True)
convert.to_lora(model, f"{args.output_dir}/lora", overwrite=True)  # rank 2r on the ORIGINAL base model
print(f"wrote {args.output_dir}/merged and {args.output_dir}/lora")
