"""What the PyTorch implementations share: the PyTorch twins of the Flax models, the device,
the data on it, the optimiser and loss, and the :class:`~benchmarks.workers.common.Runner`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from benchmarks.workers.common import (
  CRITIC_HIDDEN,
  CRITIC_WIDTH,
  IMAGE_SHAPE,
  LEARNING_RATE,
  MODELS,
  NUM_BATCHES,
  NUM_CLASSES,
  SCATTER_SHAPE,
  VAE_LATENT,
  RssProbe,
  Runner,
  TorchCudaProbe,
  UnavailableError,
  critic_fakes,
  synthetic_data,
)


def torch_model(name: str):
  """The PyTorch twin of the Flax model ``name`` (NCHW input): see :func:`jax_model`."""
  from torch import nn

  if name == "vae":
    return _torch_vae()
  if name == "tf_cnn":
    # TF 'SAME' for an 8x8 kernel, stride 2 on 28x28: 14x14 output, total padding
    # (14 - 1) * 2 + 8 - 28 = 6, split 3 / 3, so symmetric padding=3 is exact.
    return nn.Sequential(
      nn.Conv2d(1, 16, 8, stride=2, padding=3),
      nn.ReLU(),
      nn.MaxPool2d(2, stride=1),
      nn.Conv2d(16, 32, 4, stride=2),
      nn.ReLU(),
      nn.MaxPool2d(2, stride=1),
      nn.Flatten(),
      nn.Linear(32 * 4 * 4, 32),
      nn.ReLU(),
      nn.Linear(32, NUM_CLASSES),
    )
  if name == "dp_cnn":  # DPCNN defaults: widths (16, 32, 64), hidden 64, tanh, no GroupNorm
    layers: list[nn.Module] = []
    cin = IMAGE_SHAPE[-1]
    for w in (16, 32, 64):
      layers += [nn.Conv2d(cin, w, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2)]
      cin = w
    return nn.Sequential(
      *layers,
      nn.Flatten(),
      nn.Linear(64 * 3 * 3, 64),
      nn.Tanh(),
      nn.Linear(64, NUM_CLASSES),
    )
  if name == "scatter_cnn":  # ScatterCNN defaults: GroupNorm(27, no affine) on 81, widths 32
    return nn.Sequential(
      nn.GroupNorm(27, SCATTER_SHAPE[-1], eps=1e-6, affine=False),  # jaxdp's epsilon
      nn.Conv2d(SCATTER_SHAPE[-1], 32, 3, padding=1),
      nn.Tanh(),
      nn.AvgPool2d(2),
      nn.Conv2d(32, 32, 3, padding=1),
      nn.Tanh(),
      nn.Flatten(),
      nn.Linear(32 * 3 * 3, 32),
      nn.Tanh(),
      nn.Linear(32, NUM_CLASSES),
    )
  if name == "vit":
    return _torch_vit()
  if name == "critic":
    return _torch_critic()
  if name == "mlp":
    return nn.Sequential(
      nn.Flatten(),
      nn.Linear(28 * 28, 256),
      nn.ReLU(),
      nn.Linear(256, 128),
      nn.ReLU(),
      nn.Linear(128, NUM_CLASSES),
    )
  raise ValueError(f"--model {name!r} is not one of {MODELS}")


def _torch_vit():
  """The PyTorch twin of ``ViT()`` (jaxdp.models.classifier, its defaults: 7x7 patches, 16
  tokens of width 64, 2 pre-norm blocks of 4-head attention and a GELU MLP of 128, mean
  pooling, LayerNorm, head). Attention is written with Linear projections (what Opacus's
  per-sample rules cover) and the positions as an Embedding of the token ids; LayerNorm's
  epsilon and GELU's tanh approximation are Flax's."""
  import torch
  from torch import nn

  dim, heads, tokens = 64, 4, 16

  class Block(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
      self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
      self.up, self.down = nn.Linear(dim, 128), nn.Linear(128, dim)
      self.act = nn.GELU(approximate="tanh")

    def forward(self, h):
      b, t, _ = h.shape
      y = self.norm1(h)
      split = lambda z: z.reshape(b, t, heads, dim // heads).transpose(1, 2)
      q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
      w = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
      h = h + self.o((w @ v).transpose(1, 2).reshape(b, t, dim))
      return h + self.down(self.act(self.up(self.norm2(h))))

  class TorchViT(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      self.embed = nn.Linear(49, dim)
      self.pos = nn.Embedding(tokens, dim)
      self.blocks = nn.ModuleList([Block(), Block()])
      self.norm = nn.LayerNorm(dim, eps=1e-6)
      self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):  # (N, 1, 28, 28) -> 7x7 patches in Flax's (row, column, channel) order
      n = x.shape[0]
      p = x.permute(0, 2, 3, 1).reshape(n, 4, 7, 4, 7, 1).permute(0, 1, 3, 2, 4, 5)
      ids = torch.arange(tokens, device=x.device).expand(n, tokens)
      h = self.embed(p.reshape(n, tokens, 49)) + self.pos(ids)
      for block in self.blocks:
        h = block(h)
      return self.head(self.norm(h.mean(dim=1)))

  return TorchViT()


def _torch_critic():
  """The PyTorch twin of the benchmark's ``ImageCritic`` (jaxdp.models.gan; width 16, leaky
  ReLU 0.2, Dense 128): ``forward(real, fake)`` scores the pair's two images in one call, as
  the Flax loss does, real rows first. TF 'SAME' for a 4x4 stride-2 conv on 28x28 and on
  14x14 pads 1 on each side."""
  import torch
  from torch import nn

  w, act = CRITIC_WIDTH, lambda: nn.LeakyReLU(0.2)

  class TorchCritic(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      self.net = nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[-1], w, 4, stride=2, padding=1),
        act(),
        nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),
        act(),
        nn.Flatten(),
        nn.Linear(2 * w * 7 * 7, CRITIC_HIDDEN),
        act(),
        nn.Linear(CRITIC_HIDDEN, NUM_CLASSES),
      )

    def forward(self, real, fake):
      return self.net(torch.cat([real, fake]))

  return TorchCritic()


def _torch_pair_logistic():
  """The critic's logistic pair loss as a criterion ``(scores of the 2B rows, (B, 2) labels
  of the real and the generated image)``: ``softplus(-D(x, y)) + softplus(D(fake, y~))``
  per pair. ``reduction="none"`` (Opacus' ghost clipping) returns one term per ROW, real rows
  then generated ones, as Opacus' per-sample gradients are per row of the layers' batch:
  Opacus clips the real and the generated image of a pair separately (the twice-charged
  mechanism of opacus #418), jaxdp and the loop clip the pair's gradient."""
  import torch
  from torch import nn
  from torch.nn import functional

  class PairLogistic(nn.Module):
    reduction = "mean"

    def forward(self, scores, target):
      b = target.shape[0]
      d_real = scores[:b].gather(1, target[:, :1]).squeeze(1)
      d_fake = scores[b:].gather(1, target[:, 1:]).squeeze(1)
      rows = torch.cat([functional.softplus(-d_real), functional.softplus(d_fake)])
      return rows if self.reduction == "none" else rows.sum() / b

  return PairLogistic()


def _torch_vae():
  """The PyTorch twin of ``ConditionalVAE()`` (its defaults) with its negative ELBO.

  ``forward(x, y_onehot, eps)`` returns ``(logits, mu, logvar, prior mean)``; ``eps`` is the
  reparameterisation noise, drawn by the caller. Space-to-depth and depth-to-space of one
  channel are ``pixel_unshuffle`` / ``pixel_shuffle`` (same channel order for C = 1); the
  twin flattens and reshapes in Flax's HWC order so Flax's Dense kernels copy unchanged.
  """
  import torch
  from torch import nn
  from torch.nn import functional

  latent, classes = VAE_LATENT, NUM_CLASSES

  class TorchVAE(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      # TF 'SAME' for a 3x3 stride-2 conv on 14x14: 7x7 output, padding 0 before, 1 after.
      self.enc_pad = nn.ZeroPad2d((0, 1, 0, 1))
      self.enc_conv = nn.Conv2d(4, 16, 3, stride=2)
      self.enc_out = nn.Linear(7 * 7 * 16 + classes, 2 * latent)
      self.dec_hidden = nn.Linear(latent * classes + classes, 128)  # "product" conditioning
      self.dec_map = nn.Linear(128, 14 * 14 * 8)
      self.dec_conv = nn.Conv2d(8, 4, 3, padding=1)
      self.class_bias = nn.Linear(classes, 28 * 28, bias=False)
      self.prior = nn.Linear(classes, latent, bias=False)

    def forward(self, x, y, eps):
      h = torch.tanh(self.enc_conv(self.enc_pad(functional.pixel_unshuffle(x, 2))))
      h = torch.cat([h.permute(0, 2, 3, 1).flatten(1), y], 1)
      mu, logvar = self.enc_out(h).split(latent, dim=1)
      z = mu + torch.exp(0.5 * logvar) * eps
      d = torch.cat([(y[:, :, None] * z[:, None, :]).flatten(1), y], 1)
      d = torch.tanh(self.dec_hidden(d))
      d = torch.tanh(self.dec_map(d)).view(-1, 14, 14, 8).permute(0, 3, 1, 2)
      # The class bias is stored in the sub-pixel order of the conv's output (jaxdp's layout).
      d = self.dec_conv(d) + self.class_bias(y).view(-1, 14, 14, 4).permute(0, 3, 1, 2)
      return functional.pixel_shuffle(d, 2), mu, logvar, self.prior(y)

  return TorchVAE()


def _torch_neg_elbo():
  """The VAE's negative ELBO as a criterion ``(model outputs, images)``; ``reduction`` as
  PyTorch's losses have it (Opacus' ghost clipping sets it to "none" for per-example losses)."""
  from torch import nn
  from torch.nn import functional

  class NegElbo(nn.Module):
    reduction = "mean"

    def forward(self, outputs, x):
      logits, mu, logvar, prior = outputs
      bce = functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
      kl = 0.5 * (logvar.exp() + (mu - prior).square() - 1.0 - logvar)
      per_example = bce.flatten(1).sum(1) + kl.sum(1)
      return per_example if self.reduction == "none" else per_example.mean()

  return NegElbo()


@dataclasses.dataclass
class TorchSetup:
  """One PyTorch configuration before its step is built; ``batch_of(i)`` gives the model's
  inputs and the loss target of the examples at indices ``i``."""

  model_name: str
  batch: int
  device: str
  dev: Any
  probe: Any
  device_name: str
  model: Any
  optimizer: Any
  criterion: Any
  batch_of: Callable[[Any], tuple[tuple[Any, ...], Any]]
  x: Any
  y: Any
  indices: list[Any]
  info: dict[str, Any]

  def batch_at(self, k: int) -> tuple[tuple[Any, ...], Any]:
    """The inputs and target of index batch ``k % NUM_BATCHES``."""
    return self.batch_of(self.indices[k % NUM_BATCHES])


def setup(model_name: str, batch: int, device: str) -> TorchSetup:
  """The device, data, model, optimiser and loss of one PyTorch configuration."""
  import torch
  from torch import nn

  if device == "gpu":
    if not torch.cuda.is_available():
      raise UnavailableError(f"torch {torch.__version__} has no CUDA here")
    torch.backends.cudnn.benchmark = True
    # JAX's default f32 precision on the GPU is TF32 for matmuls and convolutions; match it.
    torch.set_float32_matmul_precision("high")
    dev = torch.device("cuda")
    probe: Any = TorchCudaProbe(torch)
    device_name = torch.cuda.get_device_name()
  else:
    dev = torch.device("cpu")
    probe = RssProbe()
    device_name = "cpu"
  torch.manual_seed(0)
  info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

  images, labels, index_batches = synthetic_data(batch, model_name)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)
  y = torch.from_numpy(labels).long().to(dev)
  indices = [torch.from_numpy(i).long().to(dev) for i in index_batches]
  model = torch_model(model_name).to(dev)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
  criterion: Any
  if model_name == "critic":
    criterion = _torch_pair_logistic()
    fakes, fake_labels = critic_fakes(batch)
    fake = torch.from_numpy(fakes).permute(0, 3, 1, 2).contiguous().to(dev)
    pairs = torch.stack([y, torch.from_numpy(fake_labels).long().to(dev)], dim=1)
    y = pairs  # the loader of Opacus' make_private reads only its length

    def batch_of(i):
      return (x[i], fake[i]), pairs[i]

  elif model_name == "vae":
    criterion = _torch_neg_elbo()
    y_onehot = nn.functional.one_hot(y, NUM_CLASSES).float()

    def batch_of(i):
      eps = torch.randn(len(i), VAE_LATENT, device=dev)  # reparameterisation noise
      return (x[i], y_onehot[i], eps), x[i]

  else:
    criterion = nn.CrossEntropyLoss()

    def batch_of(i):
      return (x[i],), y[i]

  return TorchSetup(
    model_name, batch, device, dev, probe, device_name, model, optimizer, criterion, batch_of,
    x, y, indices, info,
  )  # fmt: skip


def runner(
  s: TorchSetup,
  step: Callable[[int], None],
  unsupported: Callable[[Exception], str | None] = lambda e: None,
) -> Runner:
  """The :class:`Runner` of a PyTorch ``step(k)``."""
  import torch

  sync = torch.cuda.synchronize if s.device == "gpu" else (lambda: None)
  return Runner(step, sync, s.probe, "torch", s.device_name, s.info, unsupported=unsupported)
