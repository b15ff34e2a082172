"""Speech data: manifests, audio, features, text normalisation, tokenizer, batching."""
