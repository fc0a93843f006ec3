"""cpuforge's steps: each module is a plain CLI (`python -m scripts.<step> --help`)."""
