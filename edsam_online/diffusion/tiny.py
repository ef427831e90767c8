"""Offline tokenizers and small model presets (tests, the retrained LDM).

diffusers' own tiny test pipelines download their tokenizers from the hub. Here the
CLIP BPE tokenizer is rebuilt from the vocabulary that ``open_clip`` ships
(``bpe_simple_vocab_16e6.txt.gz``, the same file OpenAI's CLIP uses), and the BERT
tokenizer of the CompVis layout from a small word-piece vocabulary built here, so
nothing is fetched at run time.
"""

from __future__ import annotations

import functools
import gzip
import string
from importlib import resources

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Words of the built-in captions and common English, whole tokens in the BERT vocabulary;
# any other word still tokenizes into single characters ("##x" pieces).
_BERT_WORDS = """a an the of on in with and or at to is small medium large big tiny huge light dark
background plain white black red green blue yellow orange purple pink brown gray grey cyan magenta
teal navy olive circle square triangle star heart cross hexagon ring arrow crescent shape picture
photo image drawing sketch outline filled solid textured noisy blurry blurred bright pale""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode map (same as open_clip.tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def offline_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer (vocab 49408) built from open_clip's shipped merges file."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def offline_bert_tokenizer(max_length: int = 77, vocab_size: int | None = None) -> BertTokenizer:
    """A lower-case word-piece BertTokenizer: specials, characters, ``##`` characters and caption words.

    ``vocab_size``: pad the vocabulary with ``[unusedN]`` entries to this size, so that token ids
    span a published text encoder's embedding table (a random-weight build of it only needs
    valid ids of the right length, not the published word pieces)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    tokens += [w for w in dict.fromkeys(_BERT_WORDS) if w not in tokens]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size must be >= {len(tokens)}, got {vocab_size}")
        tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=max_length)


def small_kl_vae(block_out_channels: tuple[int, ...], latent_channels: int, resolution: int) -> AutoencoderKL:
    """A two-level AutoencoderKL without mid-block attention (a factor-2 downsampling), the
    VAE of the tiny test model and of the retrained LDM."""
    return AutoencoderKL(
        block_out_channels=block_out_channels, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, layers_per_block=1,
        norm_num_groups=8, sample_size=resolution, mid_block_add_attention=False,
    )


def small_clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, layers: int, heads: int) -> CLIPTextModel:
    """A CLIP text transformer sized for ``tokenizer`` (its vocabulary, special tokens and
    maximum length), with a 2x MLP."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def sd_ddim_scheduler(timestep_spacing: str = "leading") -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule (scaled linear, 0.00085 to 0.012)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing=timestep_spacing)


def tiny_components(resolution: int, seed: int, layout: str = "sd") -> dict:
    """Random-weight components of a very small text-to-image LDM (fast on CPU; for tests).

    32 px images -> 16x16x4 latents; ``layout="compvis"`` gives a VQModel + LDMBert instead
    of AutoencoderKL + CLIP text model.
    """
    if resolution % 2:
        raise ValueError(f"resolution must be even, got {resolution}")
    torch.manual_seed(seed)
    if layout == "sd":
        vae = small_kl_vae((8, 16), 4, resolution)
        tokenizer = offline_clip_tokenizer(max_length=16)
        text_encoder = small_clip_text_encoder(tokenizer, hidden_size=32, layers=1, heads=2)
    elif layout == "compvis":
        vae = VQModel(
            block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
            norm_num_groups=8, sample_size=resolution, num_vq_embeddings=64, mid_block_add_attention=False,
        )
        tokenizer = offline_bert_tokenizer(max_length=16)
        text_encoder = LDMBertModel(LDMBertConfig(
            vocab_size=tokenizer.vocab_size, max_position_embeddings=16, encoder_layers=1,
            encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16, d_model=32,
        ))
    else:
        raise ValueError(f"layout must be 'sd' or 'compvis', got {layout!r}")
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
    scheduler = sd_ddim_scheduler()
    for m in (vae, text_encoder, unet):
        m.eval()
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
