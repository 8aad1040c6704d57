"""``python -m gradscope``: the same as the ``gradscope`` command."""

from gradscope.cli import main

if __name__ == "__main__":  # importing this module (pytest --doctest-modules) must not run the CLI
    main()
