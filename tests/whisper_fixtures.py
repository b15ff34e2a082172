"""Tiny random Whisper models built offline, saved as complete ``save_pretrained`` directories.

The tokenizer is a byte-level BPE trained here (``tokenizers``) on a few dozen sentences, followed by Whisper's
special tokens in Whisper's order: ``<|endoftext|>``, ``<|startoftranscript|>``, the language tokens, the task and
prompt tokens, ``<|nospeech|>``, ``<|notimestamps|>`` and a few timestamp tokens. The model is a seeded
``WhisperForConditionalGeneration`` with a 16-wide, one-layer-per-side config that keeps Whisper's real 30 s encoder
context (1500 positions), so the feature extractor's window, ``audio_ctx`` and the positional table are the real ones.

Nothing is downloaded: ``build_whisper_dir(directory, multilingual)`` writes model.safetensors, config.json,
generation_config.json, tokenizer.json + tokenizer_config.json and preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TRAINING_TEXT = """call liam
call sarah
call noah
call emma
skip this song
it can't make things any worse
play the next song please
turn the volume up a little
what is the weather like today
set an alarm for seven in the morning
remind me to buy milk and bread
send a message to my sister
how long does it take to get there
open the kitchen lights
the quick brown fox jumps over the lazy dog
she sells sea shells by the sea shore
read me the latest news headlines
start a timer for ten minutes
cancel my meeting this afternoon
navigate to the nearest station
who sang this song
add eggs to the shopping list
what time is it in london
tell me a joke about cats
stop the music
pause the podcast
resume playback
skip forward thirty seconds
call mom on speaker
text dad that i am running late
""".splitlines()

LANGUAGES = ("en", "de")
TIMESTAMPS = 8
"""Timestamp tokens ``<|0.00|>`` ... after ``<|notimestamps|>`` (generation never needs more without timestamps)."""
MAX_TARGET_POSITIONS = 96
D_MODEL = 16
INIT_STD = 0.6
"""Wide random weights: the transcripts then depend on the audio (at 0.02 every clip decodes to one repeated token)."""
EOT_SCALE = 1.5
"""With seed 3, some decodes end early and others loop up to the token bound (both kinds of capped_decodes)."""


def special_tokens(multilingual: bool) -> list[str]:
    """Whisper's special tokens in Whisper's order (English-only models have just the ``<|en|>`` language)."""
    languages = LANGUAGES if multilingual else LANGUAGES[:1]
    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in languages), "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
            *(f"<|{0.02 * i:.2f}|>" for i in range(TIMESTAMPS))]


def build_tokenizer(directory: Path, multilingual: bool, vocab_size: int = 320):
    """A byte-level BPE + Whisper specials, saved as tokenizer.json + tokenizer_config.json; returns it loaded."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([" " + line for line in TRAINING_TEXT if line] + TRAINING_TEXT, trainer)
    specials = special_tokens(multilingual)
    tokenizer.add_special_tokens(specials)
    raw = directory / "raw_tokenizer.json"
    tokenizer.save(str(raw))
    fast = transformers.WhisperTokenizerFast(
        tokenizer_file=str(raw), unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", add_prefix_space=False,
        language="english" if multilingual else None, task="transcribe" if multilingual else None,
        predict_timestamps=False)
    raw.unlink()
    fast.save_pretrained(str(directory))
    return fast


def build_whisper_dir(directory: Path, multilingual: bool = False, seed: int = 3, layers: int = 1) -> Path:
    """A tiny random Whisper model with its tokenizer, generation config and feature extractor, saved offline
    (``layers`` encoder and decoder layers)."""
    import transformers

    directory.mkdir(parents=True)
    tokenizer = build_tokenizer(directory, multilingual)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special_tokens(multilingual)}
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]
    space = tokenizer.convert_tokens_to_ids("\u0120")  # byte-level "Ġ": a lone leading space
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=D_MODEL, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=MAX_TARGET_POSITIONS, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=sot, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        begin_suppress_tokens=[space, eot], suppress_tokens=[], tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"], init_std=INIT_STD)
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # the end token doubles as padding, so its embedding starts at zero: give it a real one
        eot_row = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(100 + seed)) * INIT_STD * EOT_SCALE
        model.model.decoder.embed_tokens.weight[eot] = eot_row
    generation = transformers.GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=MAX_TARGET_POSITIONS, no_timestamps_token_id=no_ts,
        suppress_tokens=[tokenizer.convert_tokens_to_ids("\u0121")], begin_suppress_tokens=[space, eot],
        is_multilingual=multilingual, return_timestamps=False)
    if multilingual:
        generation.lang_to_id = {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGUAGES}
        generation.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        generation.forced_decoder_ids = None
    model.generation_config = generation
    model.save_pretrained(str(directory))
    transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(str(directory))
    return directory


def special_ids(directory: Path) -> dict[str, int]:
    """Special-token ids of a built directory, read from its tokenizer.json (independently of dsnn)."""
    data = json.loads((Path(directory) / "tokenizer.json").read_text())
    return {entry["content"]: entry["id"] for entry in data["added_tokens"]}
