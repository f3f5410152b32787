"""Write tokenizer_reference_ids.json: the ids that sentencepiece 0.1.99, the release replit-code-v1-3b was trained
with, gives the real spiece.model on the texts of test_tokenizer.py.

Run it where sentencepiece 0.1.99 is installed (`pip install sentencepiece==0.1.99`, Python <= 3.11):

    python tests/tokenizer_make_reference_ids.py ../shared/replit-code-v1-3b/spiece.model
"""

import json
import sys
from pathlib import Path

import sentencepiece as spm


HERE = Path(__file__).resolve().parent


def main():
    if spm.__version__ != "0.1.99":
        sys.exit(f"needs sentencepiece 0.1.99, not {spm.__version__}")
    # The texts are plain constants; importing the test module would pull in transformers and torch.
    source = (HERE / "test_tokenizer.py").read_text()
    constants = {}
    exec(source[source.index("CODE = {") : source.index("# Written by tokenizer_make_reference_ids.py")], constants)
    sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
    reference = {
        "sentencepiece": spm.__version__,
        "model": "replit-code-v1-3b spiece.model",
        "ids": {text: sp.encode(text) for text in constants["REFERENCE_TEXTS"]},
    }
    (HERE / "tokenizer_reference_ids.json").write_text(json.dumps(reference, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
