"""Start the web app: `python app.py` (what Hugging Face Spaces runs). See dalle_app/ui.py."""

from dalle_app.ui import main

if __name__ == "__main__":
    main()
