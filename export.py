"""Export replit-code-v1-3b for other engines: `python3 export.py --to mpt OUT_DIR` (transformers' MptForCausalLM,
vLLM, TGI) or `python3 export.py --to gguf OUT.gguf --type q8_0` (llama.cpp, Ollama); see --help, docs/export.md."""

import sys

from replit_tools.commands import export_arguments

if __name__ == "__main__":
    args = export_arguments()  # --help and a bad command line answer before torch loads
    try:  # torch and transformers take seconds to import: Ctrl-C then is no error either
        from replit_tools.export import run
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(run(args))
