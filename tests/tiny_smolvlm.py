"""Build a tiny SmolVLM folder (config + tokenizer + processors, no weights) so SmolVLA trains offline.

Follows ../shared/reference/lerobot-v30.md §7.4: with `load_vlm_weights=false` lerobot only reads the
config, the processor and the tokenizer from `vlm_model_name`, so a random-init 2-layer model built from
this folder trains on a CPU in seconds. Words outside the tiny vocabulary (e.g. Chinese task text) become
`<unk>`: the text still flows through tokenizer and model, it just carries no meaning.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 64
PATCH = 16
SCALE = 2
SPECIALS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
            "image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"}


def build_tiny_smolvlm(dst: Path, image_size: int = IMAGE_SIZE) -> Path:
    """Write the folder `dst` (created) and return it; `vlm_model_name` can point straight at it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.smolvlm import (SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                                             SmolVLMVideoProcessor)

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    base = ["<unk>", "<pad>", "<|endoftext|>", *SPECIALS.values()]
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    words = ["pick", "the", "cube", "place", "grasp", "block", "User:", "Assistant:", "\n", "a", "up"]
    vocab = {tok: i for i, tok in enumerate(base + grid + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<end_of_utterance>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=[*SPECIALS.values(), *grid], extra_special_tokens=SPECIALS)
    size = {"longest_edge": image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        tokenizer=tok,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size, do_image_splitting=False),
        image_seq_len=(image_size // PATCH) ** 2 // SCALE ** 2)
    processor.save_pretrained(dst)
    tok.save_pretrained(dst)
    cfg = SmolVLMConfig(
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": PATCH},
        scale_factor=SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"))
    cfg.save_pretrained(dst)
    return dst


if __name__ == "__main__":
    import sys

    print(build_tiny_smolvlm(Path(sys.argv[1])))
