"""The files tfx adds to a CTranslate2 export beside CTranslate2's own (tfx/export/ctranslate2.py
says what each holds), named once for the export and for readers that must not import JAX
(serve.py's ctranslate2 backend). A mapped tokenizer's two models keep their run-directory
names, tfx.data.tokenizer's SOURCE_FILE and TARGET_FILE."""

SENTENCEPIECE_FILE = "sentencepiece.model"  # a joint tokenizer's model.
TFX_CONFIG_FILE = "tfx_config.json"  # the run's config.
VOCABULARY_MAP_FILE = "vmap.txt"  # CTranslate2's name for it.
