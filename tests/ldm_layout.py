"""Test-only: a diffusers Stable Diffusion 1.x pipeline's weights in the original (LDM / A1111) single-file layout."""

RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
          ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
UNET_SIMPLE = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def unet_prefixes():
    """(diffusers prefix, LDM prefix, is a resnet) for SD 1.x's UNet: 4 levels, 2 resnets down, 3 up."""
    out = []
    for i in range(4):
        for j in range(2):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", True))
            if i < 3:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.", False))
        for j in range(3):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", True))
            if i > 0:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", False))
        if i < 3:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op.", False))
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", False))
    out.append(("mid_block.attentions.0.", "middle_block.1.", False))
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", True) for j in range(2)]
    return out


def unet_key(key):
    for new, old in UNET_SIMPLE.items():
        if key.startswith(new):
            return old + key[len(new):]
    for new, old, resnet in unet_prefixes():
        if key.startswith(new):
            rest = key[len(new):]
            if resnet:
                for ldm, hf in RESNET:
                    if rest.startswith(hf):
                        rest = ldm + rest[len(hf):]
            return old + rest
    raise KeyError(key)


def vae_key(key):
    for part in ("encoder.", "decoder."):
        if key.startswith(part + "conv_norm_out."):
            return key.replace("conv_norm_out.", "norm_out.")
    for i in range(4):
        for j in range(3):
            key = key.replace(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            key = key.replace(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.")
        key = key.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        key = key.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.")
    for j in range(2):
        key = key.replace(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    if ".attn_1." in key:
        for hf, ldm in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            key = key.replace(".attn_1." + hf, ".attn_1." + ldm)
    return key


def to_ldm(pipe) -> dict:
    state = {}
    for key, tensor in pipe.unet.state_dict().items():
        state["model.diffusion_model." + unet_key(key)] = tensor.contiguous()
    for key, tensor in pipe.vae.state_dict().items():
        new = vae_key(key)
        if ".attn_1." in new and new.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        state["first_stage_model." + new] = tensor.contiguous()
    for key, tensor in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor.contiguous()
    return state
