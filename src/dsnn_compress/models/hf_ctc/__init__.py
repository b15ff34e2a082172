"""The ``hf-ctc`` family: Hugging Face ``Wav2Vec2ForCTC`` and siblings sharing its CTC head API.

Supported architectures (chosen from ``config.json``: ``architectures``, else ``model_type`` when the weights hold
an ``lm_head``): ``Wav2Vec2ForCTC``, ``HubertForCTC``, ``WavLMForCTC``, ``Data2VecAudioForCTC``.

Everything the adapter needs is rebuilt from the small text files of the ``save_pretrained`` directory
(``config.json``, the feature extractor's ``preprocessor_config.json`` or ``processor_config.json``, the tokenizer's
``vocab.json`` / ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``), which
:meth:`HFCTCAdapter.metadata` carries verbatim, so a bundle rebuilds the model with no other file and without the
network. ``transformers`` is optional: it is imported only when a model is built, and its absence is reported as a
:class:`DsnnError` telling how to install it. Importing this package does not import ``transformers``.

Conventions (see ``docs/huggingface.md``):

* input: the feature extractor's normalisation (``do_normalize``) of the raw waveform, zero-padded along time;
* attention mask: models whose feature encoder uses layer norm (``feat_extract_norm == "layer"``; Data2VecAudio
  always) get an ``attention_mask`` built from the input lengths; group-norm models get none, as in their training;
* loss: the model's own CTC loss on ``labels`` padded with -100, with ``ctc_zero_infinity=True`` and
  ``ctc_loss_reduction="mean"`` while the loss is computed (the stored config is left untouched);
* text: the normalised transcript is mapped to the vocabulary's case, spaces to the word delimiter (``|``);
  decoding is greedy CTC (blank = ``pad_token_id``) through the tokenizer, returned lower-cased when the
  normaliser lower-cases;
* weights: tensors keep the names ``save_pretrained`` wrote, including the legacy weight-norm names
  (``weight_g`` / ``weight_v``) of the positional convolution, mapped to and from whatever the installed
  torch/transformers use, so strict loading works and exports write the source's names;
* the convolutional feature encoder is frozen (``freeze_feature_encoder``), as Hugging Face CTC fine-tuning does.

Package layout (one job per module; none imports ``transformers`` at import time):

* :mod:`.metadata` - the directory's text files: constants, :func:`select_architecture`,
  :func:`hf_metadata_from_files` (also the family's directory describer, which the registry reaches by this
  package's path), the feature-extractor configuration, :func:`import_transformers`;
* :mod:`.adapter` - :class:`HFCTCAdapter` (the :class:`~dsnn_compress.models.base.ModelAdapter`) and the
  weight-norm rename hooks;
* :mod:`.family` - :func:`build_adapter`, :func:`adapter_from_source`, :class:`HFCTCFamily` / ``HF_CTC`` (with its
  ``export_formats`` and ``save_hf``), and the registration of the ``hf-ctc`` family (done on import of this
  package, which the registry imports lazily by its module path ``dsnn_compress.models.hf_ctc``);
* :mod:`.export` - :func:`save_hf_directory`.
"""

from __future__ import annotations

from .adapter import PRUNABLE_LINEARS, HFCTCAdapter
from .export import save_hf_directory
from .family import HF_CTC, HFCTCFamily, adapter_from_source, build_adapter
from .metadata import (
    FAMILY,
    FEATURE_EXTRACTOR_FILES,
    INSTALL_HINT,
    MODEL_FILES,
    SUPPORTED_ARCHITECTURES,
    TOKENIZER_FILES,
    hf_metadata_from_files,
    import_transformers,
    select_architecture,
)

__all__ = [
    "FAMILY",
    "FEATURE_EXTRACTOR_FILES",
    "HF_CTC",
    "INSTALL_HINT",
    "MODEL_FILES",
    "PRUNABLE_LINEARS",
    "SUPPORTED_ARCHITECTURES",
    "TOKENIZER_FILES",
    "HFCTCAdapter",
    "HFCTCFamily",
    "adapter_from_source",
    "build_adapter",
    "hf_metadata_from_files",
    "import_transformers",
    "save_hf_directory",
    "select_architecture",
]
