"""Standard architectures built from configs at their standard init, small enough for 2 CPU cores.

Libraries (the optional extra ``models``, all installable next to a CPU-only torch):
Hugging Face ``transformers``, MONAI (``monai``), ``efficientnet-pytorch`` and
``diffusers``.  None of them imports torchvision, whose PyPI build for torch
2.13 is a CUDA build that fails to import on CPU torch (and timm imports
torchvision).  Nothing is downloaded: every model is built from a config.

Each builder returns ``(model, audit keyword arguments)``; widths, depths and
inputs are shrunk from the published configs, the init is the library's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module, dict[str, Any]]

IMAGE = {"input_shape": (4, 3, 32, 32)}
TOKENS = {"input_shape": (2, 16), "input_dtype": torch.int64}


def _seeded(build: Callable[[], Built]) -> Callable[[], Built]:
    def wrapper() -> Built:
        torch.manual_seed(0)
        return build()

    wrapper.__name__ = build.__name__
    return wrapper


# -- transformers ------------------------------------------------------------------


@_seeded
def hf_resnet() -> Built:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
    return ResNetForImageClassification(config), dict(IMAGE)


@_seeded
def hf_convnext() -> Built:
    # layer_scale_init_value=1e-6: ConvNeXt's gamma (a layer-scale residual branch).
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    assert config.layer_scale_init_value == 1e-6
    return ConvNextForImageClassification(config), dict(IMAGE)


@_seeded
def hf_swin() -> Built:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=10
    )
    return SwinForImageClassification(config), dict(IMAGE)


@_seeded
def hf_vit_zero_head() -> Built:
    # torchvision's ViT zero-initialises its classification head (Dosovitskiy et
    # al. 2021 do so when fine-tuning); the same init on transformers' ViT.
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    model = ViTForImageClassification(config)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return model, dict(IMAGE)


@_seeded
def hf_mobilenet_v2() -> Built:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=10)
    return MobileNetV2ForImageClassification(config), dict(IMAGE)


@_seeded
def hf_regnet() -> Built:
    from transformers import RegNetConfig, RegNetForImageClassification

    config = RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8)
    return RegNetForImageClassification(config), dict(IMAGE)


@_seeded
def hf_bert() -> Built:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertForSequenceClassification(config), dict(TOKENS, vocab=128)


@_seeded
def hf_gpt2() -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config), dict(TOKENS, vocab=128)


@_seeded
def hf_llama() -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config), dict(TOKENS, vocab=128)


class _T5Denoiser(nn.Module):
    """T5 as it trains: encoder ids, decoder ids (the targets shifted right)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.t5 = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.t5(input_ids=ids, decoder_input_ids=ids.flip(1)).logits


@_seeded
def hf_t5() -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    return _T5Denoiser(T5ForConditionalGeneration(config)), dict(TOKENS, vocab=128)


@_seeded
def hf_wav2vec2() -> Built:
    # A convolutional feature encoder (7 plain convs, GroupNorm on the first)
    # ahead of a Transformer: the audio front-end case.
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0, layerdrop=0.0,
    )  # fmt: skip
    return Wav2Vec2ForCTC(config), {"input_shape": (2, 4000)}


@_seeded
def hf_whisper() -> Built:
    from transformers import WhisperConfig, WhisperForAudioClassification

    config = WhisperConfig(
        num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        max_source_positions=32, num_labels=10,
    )  # fmt: skip
    return WhisperForAudioClassification(config), {"input_shape": (2, 16, 64)}


# -- MONAI ---------------------------------------------------------------------------


@_seeded
def monai_densenet() -> Built:
    from monai.networks.nets import DenseNet

    model = DenseNet(
        spatial_dims=2, in_channels=3, out_channels=10, init_features=16, growth_rate=8, block_config=(2, 2, 2)
    )
    return model, dict(IMAGE)


@_seeded
def monai_resnet() -> Built:
    from monai.networks.nets import ResNet

    model = ResNet(
        block="basic", layers=(1, 1, 1, 1), block_inplanes=(16, 32, 64, 128), spatial_dims=2, n_input_channels=3,
        num_classes=10,
    )  # fmt: skip
    return model, dict(IMAGE)


@_seeded
def monai_plain_cnn() -> Built:
    # MONAI's Classifier with no normalisation at all: a plain conv net.
    from monai.networks.nets import Classifier

    model = Classifier(in_shape=(3, 32, 32), classes=10, channels=(16, 32, 64), strides=(2, 2, 2), norm=None)
    return model, dict(IMAGE)


# -- efficientnet-pytorch ----------------------------------------------------------------


@_seeded
def efficientnet_b0() -> Built:
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=32)
    return model, dict(IMAGE)


# -- diffusers ---------------------------------------------------------------------------


class _Denoiser(nn.Module):
    """A diffusion UNet as it trains: noisy image in, predicted noise out, fixed timestep."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, 10).sample


@_seeded
def diffusers_unet() -> Built:
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip
    return _Denoiser(unet), {"input_shape": (2, 3, 16, 16), "loss": "mse"}


ARCHITECTURES: dict[str, Callable[[], Built]] = {
    f.__name__: f
    for f in (
        hf_resnet, hf_convnext, hf_swin, hf_vit_zero_head, hf_mobilenet_v2, hf_regnet,
        hf_bert, hf_gpt2, hf_llama, hf_t5, hf_wav2vec2, hf_whisper,
        monai_densenet, monai_resnet, monai_plain_cnn, efficientnet_b0, diffusers_unet,
    )
}  # fmt: skip
