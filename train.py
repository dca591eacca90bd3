"""`python train.py [overrides]` in a checkout: the same as the installed `convlens-train`."""
from convlens.train import main

if __name__ == "__main__":
    main()
