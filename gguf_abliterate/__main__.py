from gguf_abliterate.cli import main

main()
