"""`python visualize.py [overrides]` in a checkout: the same as the installed `convlens-visualize`."""
from convlens.visualize import main

if __name__ == "__main__":
    main()
