from django.urls import path
from polls import views

urlpatterns = [
    path("polls/<int:question_id>/vote/", views.vote),
    path("polls/<int:question_id>/recount/", views.recount),
]
