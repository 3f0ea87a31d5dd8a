"""The Gradio app's logic (app.py is its layout): the chat assistant, Model chat (in-process or through a server),
run views, uploads and the guards on what a browser may send."""
