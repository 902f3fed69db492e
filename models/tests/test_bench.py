"""The benchmark models are the real architectures: parameter counts of SD-1.5's published modules
(unet 859,520,964; vae 83,653,863; CLIP ViT-L/14 text encoder 123,060,480) and BLIP-2 OPT-2.7b's
layer widths. Built on the meta device: shapes only, no memory."""

import torch

from cip_export import bench
from cip_export.ort_optimize import cpu_fusion_options


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_bench_pipeline_has_sd15_parameter_counts():
    with torch.device("meta"):
        pipe = bench.build_sd15_pipeline()
    assert count(pipe.unet) == 859_520_964
    assert count(pipe.vae) == 83_653_863
    assert count(pipe.text_encoder) == 123_060_480
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.skip_prk_steps


def test_blip2_bench_model_has_opt_2_7b_widths():
    with torch.device("meta"):
        model, processor = bench.build_blip2(text_layers=2, vision_layers=1, qformer_layers=2)
    text = model.config.text_config
    assert (text.hidden_size, text.ffn_dim, text.num_attention_heads, text.vocab_size) == (2560, 10240, 32, 50272)
    assert len(model.language_model.model.decoder.layers) == 2
    vision = model.config.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.image_size) == (1408, 6144, 14, 224)
    assert model.config.num_query_tokens == 32
    assert processor.image_processor.size["height"] == 224


def test_cpu_fusions_leave_out_cuda_only_ops():
    options = cpu_fusion_options("unet")
    assert not options.enable_group_norm and not options.enable_bias_splitgelu and not options.enable_nhwc_conv
    assert options.enable_attention and options.enable_layer_norm
