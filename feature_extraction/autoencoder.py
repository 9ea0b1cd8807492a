"""Stage 4 (train_autoencoder.py): the 768 -> 128 autoencoder that compresses video-language
embeddings for the Gaussians.

Layout of 4-LEGS: encoder 768 -> 512 -> 256 -> 128, decoder 128 -> 256 -> 512 -> 768, Linear +
BatchNorm + ReLU between layers, latent and output L2-normalised (embeddings live on the unit
sphere, and relevancy compares them by cosine). Loss: L2 + 0.01 * (1 - cosine).

The checkpoint (`<seq>/ae/best_ckpt.pth`) is a dict holding the state dict AND the encoder name and
layer sizes, so that features of one encoder are never decoded with an autoencoder of another.
"""

import os
import uuid

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers
from feature_extraction.relevancy import encoder_name

ENCODER_DIMS = (768, 512, 256, 128)
DECODER_DIMS = (128, 256, 512, 768)
COSINE_WEIGHT = 0.01
CKPT_FORMAT = "4legs-autoencoder-v1"


def mlp(dims):
    """Linear layers of sizes dims, BatchNorm + ReLU between them (none after the last)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    def __init__(self, encoder_dims=ENCODER_DIMS, decoder_dims=DECODER_DIMS):
        super().__init__()
        if encoder_dims[-1] != decoder_dims[0] or encoder_dims[0] != decoder_dims[-1]:
            raise ValueError(f"encoder {encoder_dims} and decoder {decoder_dims} do not fit together")
        self.encoder = mlp(encoder_dims)
        self.decoder = mlp(decoder_dims)

    @property
    def latent_dim(self):
        return self.encoder[-1].out_features

    def encode(self, x):
        """x [B, 768] -> unit latent [B, 128]."""
        return F.normalize(self.encoder(x), dim=-1)

    def decode(self, z):
        """z [B, 128] -> unit embedding [B, 768]."""
        return F.normalize(self.decoder(z), dim=-1)

    def forward(self, x):
        """x [B, 768] -> (latent [B, 128], reconstruction [B, 768])."""
        z = self.encode(x)
        return z, self.decode(z)


def ae_loss(recon, target):
    """Mean squared error + 0.01 * (1 - cosine), both averaged over the batch: recon, target [B, D]."""
    l2 = ((recon - target) ** 2).sum(-1).mean()
    cos = F.cosine_similarity(recon, target, dim=-1).mean()
    return l2 + COSINE_WEIGHT * (1.0 - cos)


def ae_ckpt_path(seq_dir):
    return os.path.join(seq_dir, "ae", "best_ckpt.pth")


def save_autoencoder(path, model, encoder_spec, **info):
    """Atomic checkpoint with everything needed to rebuild and check the model, trained on the
    features of --encoder `encoder_spec`. `info` (epoch, validation cosine, what it was made from,
    ...) is stored beside; a fresh `run_id` lets stage 5 notice a retrained AE."""
    encoder_dims = [m.in_features for m in model.encoder if isinstance(m, nn.Linear)] + [model.latent_dim]
    decoder_dims = [m.in_features for m in model.decoder if isinstance(m, nn.Linear)] + [model.decoder[-1].out_features]
    helpers.save_torch(
        path,
        {
            "format": CKPT_FORMAT,
            "encoder": encoder_name(encoder_spec),
            "encoder_spec": encoder_spec,
            "encoder_dims": encoder_dims,
            "decoder_dims": decoder_dims,
            "run_id": uuid.uuid4().hex,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            **info,
        },
    )


def load_autoencoder(path, encoder_spec, device="cpu"):
    """The trained autoencoder in eval mode, plus its checkpoint dict (without the weights).

    Raises UserError when the file is missing, is not ours, holds NaN/Inf, or was trained on the
    features of another encoder than --encoder `encoder_spec`.
    """
    seq_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    train_cmd = f"python train_autoencoder.py -s {os.path.relpath(seq_dir)} --encoder {encoder_spec}"
    if not os.path.isfile(path):
        raise helpers.UserError(f"{path} not found: {helpers.run_first('train_autoencoder.py', train_cmd)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: any unpickling error
        raise helpers.UserError(f"{path} cannot be read ({e}); retrain it: {train_cmd}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise helpers.UserError(
            f"{path} is not an autoencoder checkpoint of this project (format {CKPT_FORMAT}); retrain it: {train_cmd}"
        )
    if ckpt["encoder"] != encoder_name(encoder_spec):
        raise helpers.UserError(
            f"{path} was trained on '{ckpt['encoder']}' features, not '{encoder_name(encoder_spec)}': pass "
            f"--encoder {ckpt.get('encoder_spec', ckpt['encoder'])}, or retrain it: {train_cmd}"
        )
    if not all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()):
        raise helpers.UserError(f"{path}: its weights hold NaN/Inf; retrain it: {train_cmd}")
    model = Autoencoder(tuple(ckpt["encoder_dims"]), tuple(ckpt["decoder_dims"]))
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.to(device).eval(), ckpt
