"""An offline Hugging Face Hub cache holding a tiny DiT pipeline in ``facebook/DiT-XL-2-256``'s layout.

diffusers' ``from_pretrained("facebook/DiT-XL-2-256")`` resolves it, with ``HF_HUB_CACHE`` pointing
at the cache and ``HF_HUB_OFFLINE=1``, exactly as on a user's machine that downloaded it once:
``<cache>/models--facebook--DiT-XL-2-256/snapshots/<commit>/`` with ``refs/main`` naming the commit.
The layout is the real repository's: a ``DiTPipeline`` whose ``model_index.json`` names the
transformer by its legacy class ``Transformer2DModel``, a ``vae/`` (AutoencoderKL, here with a 2x
factor), a DDIM ``scheduler/`` and 1,000 ``id2label`` entries.
"""

import json
import os
import subprocess
import sys
import textwrap

import torch

DIT_REPO = "facebook/DiT-XL-2-256"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# what the first ImageNet class is called in DiT's id2label; the rest are stand-in names
TENCH = "tench, Tinca tinca"


def hub_env(cache: str) -> dict:
    """The environment of a process that sees only ``cache`` and no network."""
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=os.path.join(str(cache), "home"))
    env.pop("HF_HUB_ENABLE_HF_TRANSFER", None)
    return env


def snapshot_folder(cache: str, repo: str = DIT_REPO) -> str:
    return os.path.join(str(cache), "models--" + repo.replace("/", "--"), "snapshots", COMMIT)


def publish(cache: str, folder_writer, repo: str) -> str:
    """Write a repository snapshot with ``folder_writer(snapshot)`` and point ``refs/main`` at it."""
    snapshot = snapshot_folder(cache, repo)
    os.makedirs(snapshot, exist_ok=True)
    folder_writer(snapshot)
    refs = os.path.join(str(cache), "models--" + repo.replace("/", "--"), "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, "main"), "w", encoding="ascii") as handle:
        handle.write(COMMIT)
    return snapshot


def tiny_dit_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8, sample_size=8, patch_size=2, norm_num_groups=1,
                                        num_embeds_ada_norm=1000)
    with torch.no_grad():  # DiT zero-initialises its output and modulation; a trained one is not zero
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=pipe_labels())


def write_dit_repo(snapshot: str) -> None:
    pipe = tiny_dit_pipeline()
    pipe.save_pretrained(snapshot, safe_serialization=True)
    index_path = os.path.join(snapshot, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    index["transformer"] = ["diffusers", "Transformer2DModel"]  # as the real repository names it
    index["id2label"] = {str(i): name for i, name in pipe_labels().items()}
    with open(index_path, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
    config_path = os.path.join(snapshot, "transformer", "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["_class_name"] = "Transformer2DModel"
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


def pipe_labels():
    return {i: (TENCH if i == 0 else f"class {i}") for i in range(1000)}


def write_dit_hub_cache(cache: str) -> str:
    """The cache folder with ``facebook/DiT-XL-2-256``; returns the snapshot folder."""
    return publish(cache, write_dit_repo, DIT_REPO)


def run_offline(cache: str, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a process that sees only the Hub ``cache``; fails the test on error."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=hub_env(cache), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
