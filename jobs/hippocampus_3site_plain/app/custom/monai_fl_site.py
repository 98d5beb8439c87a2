"""NVFlare entry script of a monai-fl job: the site code itself is the installed monai_fl package."""

from monai_fl.fl.client import main

if __name__ == "__main__":
    main()
