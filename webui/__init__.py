"""The web side: the Gradio Blocks UI and the plain HTTP routes served beside it on one port."""
