-- The platform's whole EF Core model as its four migrations leave an empty database
-- (SPEC §8): every table of the model, not only the six the SMTP host uses, with EF's
-- names ("PK_<Table>", "FK_<Dependent>_<Principal>_<Column>", "IX_<Table>_<Columns>"),
-- the column types, defaults and index filters of the migrations, and the rows of
-- "__EFMigrationsHistory", so that the platform finds the database fully migrated.
-- The statements are those the Npgsql provider emits for the migrations' Up(), in the
-- same order (columns added by later migrations come last, as on a migrated database).
--
-- Run by `relate-smtp db init`, inside one transaction, only on a database that has
-- neither the history table's rows nor any of these tables (see PostgresStore.init_schema).

CREATE TABLE IF NOT EXISTS "__EFMigrationsHistory" (
    "MigrationId" character varying(150) NOT NULL,
    "ProductVersion" character varying(32) NOT NULL,
    CONSTRAINT "PK___EFMigrationsHistory" PRIMARY KEY ("MigrationId")
);

CREATE TABLE "Emails" (
    "Id" uuid NOT NULL,
    "MessageId" character varying(500) NOT NULL,
    "FromAddress" character varying(320) NOT NULL,
    "FromDisplayName" character varying(500),
    "Subject" character varying(1000) NOT NULL,
    "TextBody" text,
    "HtmlBody" text,
    "ReceivedAt" timestamp with time zone NOT NULL,
    "SizeBytes" bigint NOT NULL,
    "InReplyTo" character varying(500),
    "References" character varying(2000),
    "ThreadId" uuid,
    "SentByUserId" uuid,
    CONSTRAINT "PK_Emails" PRIMARY KEY ("Id")
);

CREATE TABLE "Users" (
    "Id" uuid NOT NULL,
    "OidcSubject" character varying(500) NOT NULL,
    "OidcIssuer" character varying(500) NOT NULL,
    "Email" character varying(320) NOT NULL,
    "DisplayName" character varying(500),
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastLoginAt" timestamp with time zone,
    CONSTRAINT "PK_Users" PRIMARY KEY ("Id")
);

CREATE TABLE "EmailAttachments" (
    "Id" uuid NOT NULL,
    "EmailId" uuid NOT NULL,
    "FileName" character varying(500) NOT NULL,
    "ContentType" character varying(200) NOT NULL,
    "SizeBytes" bigint NOT NULL,
    "Content" bytea NOT NULL,
    CONSTRAINT "PK_EmailAttachments" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailAttachments_Emails_EmailId" FOREIGN KEY ("EmailId") REFERENCES "Emails" ("Id") ON DELETE CASCADE
);

CREATE TABLE "EmailRecipients" (
    "Id" uuid NOT NULL,
    "EmailId" uuid NOT NULL,
    "Address" character varying(320) NOT NULL,
    "DisplayName" character varying(500),
    "Type" character varying(10) NOT NULL,
    "UserId" uuid,
    "IsRead" boolean NOT NULL,
    CONSTRAINT "PK_EmailRecipients" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailRecipients_Emails_EmailId" FOREIGN KEY ("EmailId") REFERENCES "Emails" ("Id") ON DELETE CASCADE,
    CONSTRAINT "FK_EmailRecipients_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE SET NULL
);

CREATE TABLE "Labels" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Name" character varying(100) NOT NULL,
    "Color" character varying(20) NOT NULL,
    "SortOrder" integer NOT NULL,
    "CreatedAt" timestamp with time zone NOT NULL,
    CONSTRAINT "PK_Labels" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_Labels_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "PushSubscriptions" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Endpoint" character varying(1000) NOT NULL,
    "P256dhKey" character varying(200) NOT NULL,
    "AuthKey" character varying(200) NOT NULL,
    "UserAgent" character varying(500) NOT NULL,
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastUsedAt" timestamp with time zone,
    CONSTRAINT "PK_PushSubscriptions" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_PushSubscriptions_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "SmtpApiKeys" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Name" character varying(100) NOT NULL,
    "KeyHash" character varying(128) NOT NULL,
    "Scopes" character varying(500) NOT NULL DEFAULT '[]',
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastUsedAt" timestamp with time zone,
    "RevokedAt" timestamp with time zone,
    CONSTRAINT "PK_SmtpApiKeys" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_SmtpApiKeys_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "UserEmailAddresses" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Address" character varying(320) NOT NULL,
    "IsVerified" boolean NOT NULL,
    "AddedAt" timestamp with time zone NOT NULL,
    CONSTRAINT "PK_UserEmailAddresses" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_UserEmailAddresses_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "UserPreferences" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Theme" character varying(20) NOT NULL,
    "DisplayDensity" character varying(20) NOT NULL,
    "EmailsPerPage" integer NOT NULL,
    "DefaultSort" character varying(50) NOT NULL,
    "ShowPreview" boolean NOT NULL,
    "GroupByDate" boolean NOT NULL,
    "DesktopNotifications" boolean NOT NULL,
    "EmailDigest" boolean NOT NULL,
    "DigestFrequency" character varying(20) NOT NULL,
    "DigestTime" time without time zone NOT NULL,
    "UpdatedAt" timestamp with time zone NOT NULL,
    CONSTRAINT "PK_UserPreferences" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_UserPreferences_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "EmailFilters" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "Name" character varying(200) NOT NULL,
    "IsEnabled" boolean NOT NULL,
    "Priority" integer NOT NULL,
    "FromAddressContains" character varying(500),
    "SubjectContains" character varying(500),
    "BodyContains" character varying(1000),
    "HasAttachments" boolean,
    "MarkAsRead" boolean NOT NULL,
    "AssignLabelId" uuid,
    "Delete" boolean NOT NULL,
    "CreatedAt" timestamp with time zone NOT NULL,
    "LastAppliedAt" timestamp with time zone,
    "TimesApplied" integer NOT NULL DEFAULT 0,
    CONSTRAINT "PK_EmailFilters" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailFilters_Labels_AssignLabelId" FOREIGN KEY ("AssignLabelId") REFERENCES "Labels" ("Id") ON DELETE SET NULL,
    CONSTRAINT "FK_EmailFilters_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "EmailLabels" (
    "Id" uuid NOT NULL,
    "EmailId" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "LabelId" uuid NOT NULL,
    "AssignedAt" timestamp with time zone NOT NULL,
    CONSTRAINT "PK_EmailLabels" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_EmailLabels_Emails_EmailId" FOREIGN KEY ("EmailId") REFERENCES "Emails" ("Id") ON DELETE CASCADE,
    CONSTRAINT "FK_EmailLabels_Labels_LabelId" FOREIGN KEY ("LabelId") REFERENCES "Labels" ("Id") ON DELETE CASCADE,
    CONSTRAINT "FK_EmailLabels_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE INDEX "IX_EmailAttachments_EmailId" ON "EmailAttachments" ("EmailId");

CREATE INDEX "IX_EmailFilters_AssignLabelId" ON "EmailFilters" ("AssignLabelId");

CREATE INDEX "IX_EmailFilters_UserId_Priority" ON "EmailFilters" ("UserId", "Priority");

CREATE UNIQUE INDEX "IX_EmailLabels_EmailId_LabelId" ON "EmailLabels" ("EmailId", "LabelId");

CREATE INDEX "IX_EmailLabels_LabelId" ON "EmailLabels" ("LabelId");

CREATE INDEX "IX_EmailLabels_UserId_LabelId" ON "EmailLabels" ("UserId", "LabelId");

CREATE INDEX "IX_EmailRecipients_Address" ON "EmailRecipients" ("Address");

CREATE INDEX "IX_EmailRecipients_EmailId" ON "EmailRecipients" ("EmailId");

CREATE INDEX "IX_EmailRecipients_UserId_IsRead" ON "EmailRecipients" ("UserId", "IsRead");

CREATE INDEX "IX_Emails_MessageId" ON "Emails" ("MessageId");

CREATE INDEX "IX_Emails_ReceivedAt" ON "Emails" ("ReceivedAt");

CREATE INDEX "IX_Emails_ThreadId" ON "Emails" ("ThreadId");

CREATE UNIQUE INDEX "IX_Labels_UserId_Name" ON "Labels" ("UserId", "Name");

CREATE INDEX "IX_PushSubscriptions_UserId" ON "PushSubscriptions" ("UserId");

CREATE INDEX "IX_SmtpApiKeys_RevokedAt" ON "SmtpApiKeys" ("RevokedAt");

CREATE INDEX "IX_SmtpApiKeys_UserId" ON "SmtpApiKeys" ("UserId");

CREATE INDEX "IX_UserEmailAddresses_Address" ON "UserEmailAddresses" ("Address");

CREATE UNIQUE INDEX "IX_UserEmailAddresses_UserId_Address" ON "UserEmailAddresses" ("UserId", "Address");

CREATE UNIQUE INDEX "IX_UserPreferences_UserId" ON "UserPreferences" ("UserId");

CREATE INDEX "IX_Users_Email" ON "Users" ("Email");

CREATE UNIQUE INDEX "IX_Users_OidcIssuer_OidcSubject" ON "Users" ("OidcIssuer", "OidcSubject");

INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion")
VALUES ('20260131230315_InitialCreate', '10.0.2');

ALTER TABLE "SmtpApiKeys" ADD "KeyPrefix" character varying(12);

CREATE INDEX "IX_SmtpApiKeys_KeyPrefix_RevokedAt" ON "SmtpApiKeys" ("KeyPrefix", "RevokedAt") WHERE "RevokedAt" IS NULL;

INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion")
VALUES ('20260206125502_AddApiKeyPrefix', '10.0.2');

ALTER TABLE "UserEmailAddresses" ADD "VerificationToken" character varying(6);

ALTER TABLE "UserEmailAddresses" ADD "VerificationTokenExpiresAt" timestamp with time zone;

INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion")
VALUES ('20260209000000_AddEmailVerificationToken', '10.0.2');

CREATE TABLE "OutboundEmails" (
    "Id" uuid NOT NULL,
    "UserId" uuid NOT NULL,
    "FromAddress" character varying(320) NOT NULL,
    "FromDisplayName" character varying(500),
    "Subject" character varying(1000) NOT NULL,
    "TextBody" text,
    "HtmlBody" text,
    "Status" character varying(20) NOT NULL,
    "InReplyTo" character varying(500),
    "References" character varying(2000),
    "OriginalEmailId" uuid,
    "MessageId" character varying(500),
    "CreatedAt" timestamp with time zone NOT NULL,
    "QueuedAt" timestamp with time zone,
    "SentAt" timestamp with time zone,
    "RetryCount" integer NOT NULL,
    "NextRetryAt" timestamp with time zone,
    "LastError" character varying(2000),
    CONSTRAINT "PK_OutboundEmails" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_OutboundEmails_Users_UserId" FOREIGN KEY ("UserId") REFERENCES "Users" ("Id") ON DELETE CASCADE
);

CREATE TABLE "OutboundRecipients" (
    "Id" uuid NOT NULL,
    "OutboundEmailId" uuid NOT NULL,
    "Address" character varying(320) NOT NULL,
    "DisplayName" character varying(500),
    "Type" character varying(10) NOT NULL,
    "Status" character varying(20) NOT NULL,
    "StatusMessage" character varying(1000),
    "DeliveredAt" timestamp with time zone,
    CONSTRAINT "PK_OutboundRecipients" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_OutboundRecipients_OutboundEmails_OutboundEmailId" FOREIGN KEY ("OutboundEmailId") REFERENCES "OutboundEmails" ("Id") ON DELETE CASCADE
);

CREATE TABLE "OutboundAttachments" (
    "Id" uuid NOT NULL,
    "OutboundEmailId" uuid NOT NULL,
    "FileName" character varying(500) NOT NULL,
    "ContentType" character varying(200) NOT NULL,
    "SizeBytes" bigint NOT NULL,
    "Content" bytea NOT NULL,
    CONSTRAINT "PK_OutboundAttachments" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_OutboundAttachments_OutboundEmails_OutboundEmailId" FOREIGN KEY ("OutboundEmailId") REFERENCES "OutboundEmails" ("Id") ON DELETE CASCADE
);

CREATE TABLE "DeliveryLogs" (
    "Id" uuid NOT NULL,
    "OutboundEmailId" uuid NOT NULL,
    "RecipientId" uuid,
    "RecipientAddress" character varying(320) NOT NULL,
    "MxHost" character varying(500),
    "SmtpStatusCode" integer,
    "SmtpResponse" character varying(2000),
    "Success" boolean NOT NULL,
    "ErrorMessage" character varying(2000),
    "AttemptNumber" integer NOT NULL,
    "AttemptedAt" timestamp with time zone NOT NULL,
    "Duration" interval,
    CONSTRAINT "PK_DeliveryLogs" PRIMARY KEY ("Id"),
    CONSTRAINT "FK_DeliveryLogs_OutboundEmails_OutboundEmailId" FOREIGN KEY ("OutboundEmailId") REFERENCES "OutboundEmails" ("Id") ON DELETE CASCADE,
    CONSTRAINT "FK_DeliveryLogs_OutboundRecipients_RecipientId" FOREIGN KEY ("RecipientId") REFERENCES "OutboundRecipients" ("Id") ON DELETE SET NULL
);

CREATE INDEX "IX_OutboundEmails_CreatedAt" ON "OutboundEmails" ("CreatedAt");

CREATE INDEX "IX_OutboundEmails_Status" ON "OutboundEmails" ("Status");

CREATE INDEX "IX_OutboundEmails_Status_NextRetryAt" ON "OutboundEmails" ("Status", "NextRetryAt");

CREATE INDEX "IX_OutboundEmails_UserId" ON "OutboundEmails" ("UserId");

CREATE INDEX "IX_OutboundRecipients_OutboundEmailId" ON "OutboundRecipients" ("OutboundEmailId");

CREATE INDEX "IX_OutboundAttachments_OutboundEmailId" ON "OutboundAttachments" ("OutboundEmailId");

CREATE INDEX "IX_DeliveryLogs_AttemptedAt" ON "DeliveryLogs" ("AttemptedAt");

CREATE INDEX "IX_DeliveryLogs_OutboundEmailId" ON "DeliveryLogs" ("OutboundEmailId");

CREATE INDEX "IX_DeliveryLogs_RecipientId" ON "DeliveryLogs" ("RecipientId");

INSERT INTO "__EFMigrationsHistory" ("MigrationId", "ProductVersion")
VALUES ('20260209000000_AddOutboundEmailTables', '10.0.2');
