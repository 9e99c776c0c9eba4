from leafe.cli import main

# vLLM and Ray start processes that re-import the main module; only the real main runs the CLI.
if __name__ == "__main__":
    main()
