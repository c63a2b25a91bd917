"""The PyTorch twins against the Flax models: the same outputs for the same weights."""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.workers.common import MODELS, NUM_CLASSES, VAE_LATENT, input_shape
from benchmarks.workers.jax_setup import init_params, jax_model
from benchmarks.workers.torch_setup import torch_model


def _perturbed(params: Any, seed: int) -> Any:
  """``params`` plus N(0, 0.05^2) noise, so zero-initialised biases (and the VAE's zero
  prior) are really compared by :func:`check_models`, not matched by chance."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params
  )


def _copy_weights(pairs: list[tuple[Any, dict[str, Any]]], flat_chw: tuple[int, ...] | None):
  """Copies Flax layers' params into PyTorch layers: Conv (HWIO -> OIHW), Dense (transposed;
  the first Dense after a ``(C, H, W)`` flatten gets its rows reordered from Flax's HWC order)
  and GroupNorm (scale, bias; a Flax GroupNorm or Affine)."""
  import numpy as np
  import torch
  from torch import nn

  first_dense = True
  with torch.no_grad():
    for layer, p in pairs:
      if isinstance(layer, nn.GroupNorm):
        weight = np.asarray(p["scale"])
      elif isinstance(layer, nn.Conv2d):
        weight = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
      else:
        kernel = np.asarray(p["kernel"])
        if first_dense and flat_chw is not None:
          c, h, w = flat_chw
          kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        first_dense = False
        weight = kernel.T
      if tuple(layer.weight.shape) != weight.shape:
        raise AssertionError(f"{layer}: torch {tuple(layer.weight.shape)} vs flax {weight.shape}")
      layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
      if layer.bias is not None:
        layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))


def _check_classifier(name: str) -> dict[str, Any]:
  params, flax_out, tmodel, torch_out, _ = _copied_classifier(name)
  return _compare(params, tmodel, {"logits": (flax_out, torch_out)})


def _copied_classifier(name: str) -> tuple[Any, Any, Any, Any, Any]:
  """``(params, flax logits, torch model, torch logits, images)`` of a classifier-shaped
  model (convs, dense layers, a GroupNorm) whose perturbed Flax weights are copied into its
  PyTorch twin (the twin's ``net`` where it wraps one, as the critic's does)."""
  import jax
  import numpy as np
  import torch
  from torch import nn

  model, _ = jax_model(name)
  params = _perturbed(init_params(model, input_shape(name)), 1)
  images = np.random.default_rng(0).standard_normal((4, *input_shape(name)), dtype=np.float32)
  flax_out = np.asarray(jax.jit(model.apply)({"params": params}, images))
  tmodel = torch_model(name)
  net = getattr(tmodel, "net", tmodel)
  flat_shape: list[tuple[int, ...]] = []
  flatten = next(m for m in net.modules() if isinstance(m, nn.Flatten))
  flatten.register_forward_hook(lambda m, i, o, shapes=flat_shape: shapes.append(i[0].shape))
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    net(timages)  # records the (N, C, H, W) shape that is flattened
  kinds = (nn.Conv2d, nn.Linear, nn.GroupNorm)
  layers = [m for m in net.modules() if isinstance(m, kinds) and m.weight is not None]
  # Flax names count per kind; PyTorch's order is GroupNorm, convs, then dense layers (the
  # ScatterCNN's GroupNorm is a parameter-free normalisation and an Affine in Flax).
  keys = [
    f"{kind}_{i}"
    for kind in ("GroupNorm", "Affine", "Conv", "Dense")
    for i in range(sum(k.startswith(kind + "_") for k in params))
  ]
  if len(layers) != len(keys):
    raise AssertionError(f"{name}: {len(layers)} torch layers, {len(keys)} flax")
  flat = tuple(flat_shape[0][1:]) if len(flat_shape[0]) == 4 else None
  _copy_weights([(layer, params[k]) for layer, k in zip(layers, keys, strict=True)], flat)
  with torch.no_grad():
    torch_out = net(timages).numpy()
  return params, flax_out, tmodel, torch_out, images


def _check_critic() -> dict[str, Any]:
  """The critic's scores, and its pair loss on pairs of the same images (real: the first
  two, generated: the last two)."""
  import jax
  import numpy as np
  import torch

  from benchmarks.workers.torch_setup import _torch_pair_logistic

  params, flax_out, tmodel, torch_out, images = _copied_classifier("critic")
  _, loss = jax_model("critic")
  labels, fake_labels = np.array([3, 7]), np.array([1, 9])
  pairs = {"image": images[:2], "label": labels, "fake": images[2:], "fake_label": fake_labels}
  per_pair = jax.vmap(lambda ex: loss(params, ex, None)[0])(pairs)
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  target = torch.from_numpy(np.stack([labels, fake_labels], 1)).long()
  with torch.no_grad():
    torch_loss = _torch_pair_logistic()(tmodel(timages[:2], timages[2:]), target).numpy()
  return _compare(
    params,
    tmodel,
    {"logits": (flax_out, torch_out), "pair_loss": (np.mean(per_pair), torch_loss)},
  )


def _check_vae() -> dict[str, Any]:
  import numpy as np
  import torch

  from jaxdp.models import ConditionalVAE

  model, _ = jax_model("vae")
  params = _perturbed(init_params(model, input_shape("vae")), 2)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(4, *input_shape("vae"))).astype(np.float32)
  labels = np.array([0, 3, 7, 9], np.int32)
  eps = rng.standard_normal((4, VAE_LATENT)).astype(np.float32)
  v = {"params": params}
  mu, logvar = model.apply(v, images, labels, method=ConditionalVAE.encode)
  z = mu + np.exp(0.5 * np.asarray(logvar)) * eps
  logits = model.apply(v, z, labels, method=ConditionalVAE.decode)
  prior = model.apply(v, labels, method=ConditionalVAE.prior_mean)
  tmodel = torch_model("vae")
  enc, dec = params["encoder"], params["decoder_net"]
  pairs = [
    (tmodel.enc_conv, enc["Conv_0"]),
    (tmodel.enc_out, enc["Dense_0"]),
    (tmodel.dec_hidden, dec["Dense_0"]),
    (tmodel.dec_map, dec["Dense_1"]),
    (tmodel.dec_conv, dec["Conv_0"]),
    (tmodel.class_bias, dec["class_bias"]),
    (tmodel.prior, params["prior"]),
  ]
  _copy_weights(pairs, None)  # the twin flattens in Flax's HWC order itself
  onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), NUM_CLASSES).float()
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    out = tmodel(timages, onehot, torch.from_numpy(eps))
  pairs_out = {
    "logits": (np.asarray(logits), out[0].permute(0, 2, 3, 1).numpy()),
    "mu": (np.asarray(mu), out[1].numpy()),
    "logvar": (np.asarray(logvar), out[2].numpy()),
    "prior": (np.asarray(prior), out[3].numpy()),
  }
  return _compare(params, tmodel, pairs_out)


def _check_vit() -> dict[str, Any]:
  import jax
  import numpy as np
  import torch

  model, _ = jax_model("vit")
  params = _perturbed(init_params(model, input_shape("vit")), 3)
  images = np.random.default_rng(0).standard_normal((4, *input_shape("vit")), dtype=np.float32)
  flax_out = np.asarray(jax.jit(model.apply)({"params": params}, images))
  tmodel = torch_model("vit")
  # DenseGeneral kernels (64, heads, 16) and (heads, 16, 64): input axes first, as Linear's.
  dense = lambda p: {"kernel": np.asarray(p["kernel"]).reshape(64, -1),
                     "bias": np.asarray(p["bias"]).reshape(-1)}  # fmt: skip
  pairs = [(tmodel.embed, params["Dense_0"]), (tmodel.head, params["Dense_5"])]
  for i, block in enumerate(tmodel.blocks):
    attention = params[f"MultiHeadDotProductAttention_{i}"]
    names = (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
    pairs += [(getattr(block, n), dense(attention[name])) for n, name in names]
    # Flax names layers as they are built: the MLP's outer Dense(dim) before its inner one.
    pairs += [(block.down, params[f"Dense_{1 + 2 * i}"]), (block.up, params[f"Dense_{2 + 2 * i}"])]
  _copy_weights(pairs, None)
  with torch.no_grad():
    tmodel.pos.weight.copy_(torch.from_numpy(np.asarray(params["Embed_0"]["embedding"])))
    norms = [n for b in tmodel.blocks for n in (b.norm1, b.norm2)] + [tmodel.norm]
    for k, norm in enumerate(norms):
      norm.weight.copy_(torch.from_numpy(np.asarray(params[f"LayerNorm_{k}"]["scale"])))
      norm.bias.copy_(torch.from_numpy(np.asarray(params[f"LayerNorm_{k}"]["bias"])))
    timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    torch_out = tmodel(timages).numpy()
  return _compare(params, tmodel, {"logits": (flax_out, torch_out)})


def _compare(params: Any, tmodel: Any, outputs: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
  import jax
  import numpy as np

  diffs = {k: float(np.max(np.abs(a - b))) for k, (a, b) in outputs.items()}
  return {
    "max_abs_diff": max(diffs.values()),
    "diffs": diffs,
    "params_flax": sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)),
    "params_torch": sum(p.numel() for p in tmodel.parameters()),
  }


def check_models() -> dict[str, Any]:
  """Copies each Flax model's (perturbed) weights into its PyTorch twin and compares their
  outputs (the VAE's at the same reparameterisation noise): max |difference| per model."""
  special = {"vae": _check_vae, "vit": _check_vit, "critic": _check_critic}
  return {name: special.get(name, functools.partial(_check_classifier, name))() for name in MODELS}
